from __future__ import annotations

import json

import pytest
import torch

from ddad import AdaptConfig, load_config
from ddad.methods.ddad.adaptation import adaptation_loss, frozen_copy
from ddad.methods.ddad.extractors import adapted_checkpoints
from ddad.backbones import create_backbone
from ddad.cli import main
from ddad.methods.ddad.presets import PRESETS, get_setting
from ddad.engine.recipe import TrainConfig
from ddad.runs import RunDir

from .conftest import MOBILENET


def pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    x0 = (y + 0.1 * torch.randn(y.shape, generator=g)).clamp(-1, 1)  # a near-identical "reconstruction"
    return x0, y


def run_steps(lambda_dl, steps=8):
    torch.manual_seed(0)
    phi = create_backbone("mobilenet_v2", (1, 2, 3), weights=str(MOBILENET) if MOBILENET.is_file() else "random")
    phibar = frozen_copy(phi)
    before = {k: v.clone() for k, v in phibar.state_dict().items()}
    opt = torch.optim.AdamW(phi.parameters(), lr=1e-3)
    x0, y = pair()
    phi.train()
    losses = []
    for _ in range(steps):
        loss = adaptation_loss(phi, phibar, x0, y, (1, 2, 3), lambda_dl)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(loss)
    return phi, phibar, before, losses


def test_frozen_copy_is_bit_identical_and_holds_no_gradient():
    phi, phibar, before, _ = run_steps(0.1, steps=3)
    after = phibar.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in phibar.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(phi.parameters(), phibar.parameters()))


def test_loss_decreases_and_distillation_keeps_features_close():
    _, _, _, with_dl = run_steps(0.1)
    assert with_dl[-1].similarity < with_dl[0].similarity
    _, _, _, without = run_steps(0.0)
    drift_with = float((with_dl[-1].distill_target + with_dl[-1].distill_recon).detach())
    drift_without = float((without[-1].distill_target + without[-1].distill_recon).detach())
    assert drift_with < drift_without


def test_presets_match_the_papers_tables():
    cable = get_setting("mvtec", "cable")
    assert (cable.w, cable.epochs, cable.adapt_epochs, cable.v, cable.lambda_dl) == (3, 3000, 0, 1.0, 0.1)
    pcb1 = get_setting("visa", "pcb1")
    assert (pcb1.w, pcb1.epochs, pcb1.adapt_epochs, pcb1.v, pcb1.lambda_dl, pcb1.adapt_batch_size) == \
        (9, 500, 8, 7.0, 0.01, 16)
    screw_s = get_setting("mvtec-s", "screw")
    assert (screw_s.w, screw_s.epochs, screw_s.adapt_epochs, screw_s.model) == (2, 2000, None, "ddad-s")
    assert get_setting("visa", "cashew").v == 1.5
    assert get_setting("mvtec", "wood").adapt_epochs == 16 and get_setting("mvtec", "carpet").epochs == 2500
    assert get_setting("mvtec-s", "transistor").epochs == 4000
    assert len(PRESETS["mvtec"]) == len(PRESETS["mvtec-s"]) == 15 and len(PRESETS["visa"]) == 12
    with pytest.raises(ValueError, match="categories"):
        get_setting("visa", "bottle")


def test_preset_flag_sets_the_run_and_flags_override(tmp_path, synth_root):
    from ddad.cli import build_parser, train_settings as _train_config

    args = build_parser().parse_args(["train", "--preset", "mvtec", "--category", "cable", "--data-root", "x",
                                      "--epochs", "7"])
    config, _ = _train_config(args)
    assert config.detect.sampler.w == 3 and config.train.epochs == 7 and config.model.base_channels == 64
    assert config.adapt.lambda_dl == 0.1 and config.train.batch_size == 32 and config.data.image_size == 256
    # the paper's tables come with the paper's training recipe
    assert config.train == TrainConfig.recipe("paper", epochs=7) and config.adapt.train_batchnorm is True


def test_recipe_flag_and_stored_runs_from_before_recipes(tmp_path):
    import yaml

    from ddad.cli import build_parser, train_settings as _train_config
    from ddad import RunConfig

    def parse(*extra):  # on a GPU or with the budget named (a CPU run naming none gets 10 minutes)
        return _train_config(build_parser().parse_args(["train", "--data-root", "x", "--category", "c",
                                                        "--epochs", str(TrainConfig.epochs), *extra]))[0]

    assert parse().train == TrainConfig()
    assert parse("--recipe", "paper").train == TrainConfig.recipe("paper")
    # adaptation: BatchNorm statistics frozen by default, following the data in the paper's recipe
    assert parse().adapt.train_batchnorm is False and parse("--recipe", "paper").adapt.train_batchnorm is True
    assert parse("--recipe", "paper", "--lr", "1e-4").train == TrainConfig.recipe("paper", lr=1e-4)
    assert parse("--max-timestep", "-1").train.max_timestep is None
    assert parse("--max-timestep", "300", "--minutes", "25").train.max_minutes == 25
    # a run directory written before recipes existed was trained with the paper's recipe
    run = RunDir(tmp_path / "old")
    data = RunConfig().to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k in ("epochs", "batch_size", "lr", "weight_decay",
                                                                      "seed", "checkpoint_every")}
    data["train"].update(lr=3e-4, weight_decay=0.05)
    run.root.mkdir()
    run.config_path.write_text(yaml.safe_dump(data))
    assert load_config(run).train == TrainConfig.recipe("paper", batch_size=data["train"]["batch_size"])


@pytest.fixture(scope="module")
def adapted_run(tmp_path_factory, synth_root):
    run = tmp_path_factory.mktemp("adapt") / "run"
    assert main(["train", "--data-root", str(synth_root), "--category", "stripes", "--model", "tiny",
                 "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--run-dir", str(run), "--quiet",
                 "--set", "detect.backbone=mobilenet_v2", "--set", "detect.backbone_weights=random",
                 "--set", "detect.sampler.start_step=50", "--set", "detect.sampler.skip=25", "--set", "detect.crop=1.0",
                 "--set", "detect.scoring.sigma=1.0"]) == 0
    return run


def test_adapt_writes_resumable_epochs_and_test_uses_them(adapted_run):
    r = RunDir(adapted_run)
    assert main(["adapt", str(adapted_run), "--epochs", "1", "--batch-size", "4", "--start-step", "50",
                 "--quiet"]) == 0
    assert [e for e, _ in adapted_checkpoints(r)] == [1]
    assert main(["adapt", str(adapted_run), "--epochs", "2", "--quiet"]) == 0  # resumes at epoch 1
    assert [e for e, _ in adapted_checkpoints(r)] == [1, 2]
    assert "adaptation resumed from epoch 1" in r.log_path.read_text()
    assert main(["test", str(adapted_run), "--quiet", "--no-images"]) == 0
    assert json.loads((r.test_dir / "metrics.json").read_text())["extractor"] == "adapted"
    adapted_scores = (r.test_dir / "scores.csv").read_text()
    assert main(["test", str(adapted_run), "--quiet", "--no-images", "--pretrained"]) == 0
    (other,) = (r.root / "experiments").iterdir()  # other settings than the run's: written apart
    assert json.loads((other / "metrics.json").read_text())["extractor"] == "pretrained"
    assert json.loads((r.test_dir / "metrics.json").read_text())["extractor"] == "adapted"
    assert (other / "scores.csv").read_text() != adapted_scores  # the adapted extractor changed the scores
    # the detector's extractor holds exactly the weights of the last adapted epoch
    from ddad import load_detector
    from ddad.checkpoint import Checkpoint

    detector, _ = load_detector(r, calibrate=False, progress=False)
    stored = Checkpoint(adapted_checkpoints(r)[-1][1]).state_dict("extractor")
    loaded = detector.extractor.state_dict()
    assert loaded and all(torch.equal(v, stored[k]) for k, v in loaded.items())


def test_resumed_adaptation_equals_an_uninterrupted_one(adapted_run, tmp_path):
    import shutil

    from ddad.checkpoint import Checkpoint

    runs = {}
    for name in ("resumed", "whole"):
        runs[name] = tmp_path / name
        shutil.copytree(adapted_run, runs[name], ignore=shutil.ignore_patterns("adapted", "calibration", "cache"))
    args = ["--batch-size", "4", "--start-step", "50", "--quiet"]
    assert main(["adapt", str(runs["resumed"]), "--epochs", "1", *args]) == 0
    assert main(["adapt", str(runs["resumed"]), "--epochs", "2", "--quiet"]) == 0
    assert main(["adapt", str(runs["whole"]), "--epochs", "2", *args]) == 0
    a = Checkpoint(adapted_checkpoints(RunDir(runs["resumed"]))[-1][1]).tensors
    b = Checkpoint(adapted_checkpoints(RunDir(runs["whole"]))[-1][1]).tensors
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_batchnorm_statistics_stay_frozen_unless_asked(adapted_run, tmp_path, batchnorm):
    """ddad's default keeps the backbone's BatchNorm running statistics; --batchnorm train (the authors'
    code, and --recipe paper) lets them follow the adaptation batches."""
    import shutil

    from ddad.checkpoint import Checkpoint

    run = tmp_path / "run"
    shutil.copytree(adapted_run, run, ignore=shutil.ignore_patterns("adapted"))
    assert main(["adapt", str(run), "--epochs", "1", "--batch-size", "4", "--start-step", "50", "--quiet",
                 "--batchnorm", batchnorm]) == 0
    state = Checkpoint(adapted_checkpoints(RunDir(run))[-1][1]).state_dict("extractor")
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    assert means  # MobileNetV2 has BatchNorm layers
    # random weights: fresh BatchNorm statistics are exactly 0 (mean); only training them moves them
    moved = any(bool(m.abs().max() > 0) for m in means)
    assert moved == (batchnorm == "train")
    assert load_config(run).adapt.train_batchnorm == (batchnorm == "train")


def test_rescoring_a_stored_reconstruction_equals_a_full_run(adapted_run, monkeypatch):
    from ddad.methods.ddad.detector import Detector
    from ddad import test_run, with_detection
    from ddad.methods.ddad.sweep import sweep

    r = RunDir(adapted_run)
    config = load_config(r)
    base = config.detect
    rows = sweep(r, config, [base.sampler.w], [0.5, 2.0], ["pixel", "feature", "combined"], ["pretrained"],
                 progress=False)
    # the validation split's reconstructions (thresholds) are cached by the first full run
    test_run(r, config, out_dir=r.root / "t", save_images=False, progress=False)
    # every reconstruction is now cached: a full run must not call the sampler again
    def no_diffusion(*a, **k):
        raise AssertionError("diffusion re-ran")

    monkeypatch.setattr(Detector, "reconstruct", no_diffusion)
    for row in rows:
        detect = with_detection(config, mode=row["mode"], v=row["v"], adapted=False)
        full = test_run(r, detect, out_dir=r.root / "t", save_images=False, progress=False)
        for key in ("image_auroc", "pixel_auroc", "pro"):
            assert getattr(full.overall, key) == pytest.approx(row[key], abs=1e-9), (row, key)
    assert len({(r_["mode"], r_["v"]) for r_ in rows}) == 4  # pixel, feature, combined x 2 v
    pixel_only = sweep(r, config, [base.sampler.w], [1.0], ["pixel"], ["pretrained"], progress=False)
    assert [p["mode"] for p in pixel_only] == ["pixel"]
    assert pixel_only[0]["image_auroc"] == pytest.approx(
        next(x for x in rows if x["mode"] == "pixel")["image_auroc"])
    assert AdaptConfig().lambda_dl == 0.1 and AdaptConfig().lr == 1e-4
