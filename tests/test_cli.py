from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ddad.cli import main
from ddad.runs import RunDir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["synth", str(root / "data"), "--size", "32", "--train", "6", "--test-good", "3",
                 "--test-defective", "1", "--categories", "washer"]) == 0
    run = root / "run"
    args = ["train", "--data-root", str(root / "data"), "--category", "washer", "--model", "tiny",
            "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--checkpoint-every", "1",
            "--run-dir", str(run), "--quiet", "--set", "detect.scoring.mode=pixel",
            "--set", "detect.sampler.start_step=100", "--set", "detect.sampler.skip=50", "--set", "detect.crop=1.0"]
    assert main(args) == 0
    return root, run


def test_train_writes_a_resumable_run(trained, capsys):
    root, run = trained
    r = RunDir(run)
    assert r.config_path.is_file() and (run / "dataset.json").is_file() and r.log_path.is_file()
    assert [e for e, _ in r.checkpoints()] == [1]
    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "2", "--quiet"]) == 0
    assert [e for e, _ in r.checkpoints()] == [1, 2]
    assert "resumed from epoch-00001" in r.log_path.read_text()
    # a second fresh training into the same folder would overwrite it: refused
    assert main(["train", "--data-root", str(root / "data"), "--category", "washer", "--run-dir", str(run),
                 "--quiet"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    # resuming with different data settings is refused
    assert main(["train", "--resume", "--run-dir", str(run), "--image-size", "64"]) == 2


def test_test_writes_metrics_scores_and_images(trained, capsys):
    _, run = trained
    assert main(["test", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n_images"] == 6 and metrics["n_defective"] == 3
    rows = list(csv.DictReader(open(run / "test" / "scores.csv")))
    # recomputed from scores.csv: image AUROC as the Mann-Whitney U statistic, the threshold by brute force
    from scipy.stats import mannwhitneyu

    scores = [float(r["score"]) for r in rows]
    labels = [int(r["label"]) for r in rows]
    bad = [s for s, y in zip(scores, labels) if y]
    good = [s for s, y in zip(scores, labels) if not y]
    u = mannwhitneyu(bad, good, alternative="two-sided").statistic
    assert metrics["image_auroc"] == pytest.approx(u / (len(bad) * len(good)), abs=1e-12)

    def f1(threshold):
        tp = sum(s >= threshold and y for s, y in zip(scores, labels))
        fp = sum(s >= threshold and not y for s, y in zip(scores, labels))
        return 2 * tp / (2 * tp + fp + (sum(labels) - tp))

    oracle = metrics["oracle_threshold"]["threshold"]  # F1-optimal on the test split, reported apart
    assert f1(oracle) == pytest.approx(max(f1(s) for s in scores), abs=1e-12)
    assert "validation" in metrics["threshold_source"] and metrics["decision"]["target"]
    assert len(rows) == 6 and {r["defect_type"] for r in rows} == {"good", "scratch", "spot", "missing"}
    assert len(list((run / "test" / "images").glob("*.png"))) == 6
    assert (run / "threshold.json").is_file()
    # scores are written exactly: the F1-optimal threshold is one of them, bit for bit
    assert oracle in {float(r["score"]) for r in rows}
    assert "image AUROC" in capsys.readouterr().out


def test_predict_scores_folders_and_matches_test(trained):
    root, run = trained
    main(["test", str(run), "--quiet", "--no-images"])
    out = root / "pred"
    assert main(["predict", str(run), str(root / "data" / "washer" / "test"), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 6 and all(r["decision"] in ("good", "defective") for r in rows)
    assert len(list((out / "images").rglob("*.png"))) == 6 and all((out / r["panel"]).is_file() for r in rows)
    # the same image gets the same score in predict as in test (content-seeded noise)
    tested = {r["image"]: float(r["score"]) for r in csv.DictReader(open(run / "test" / "scores.csv"))}
    for r in rows:
        assert float(r["score"]) == pytest.approx(tested[r["image"]], rel=1e-5)


def test_bad_input_gives_clear_errors(trained, capsys, tmp_path):
    root, run = trained
    assert main(["train", "--data-root", str(root / "data"), "--category", "bottle", "--run-dir",
                 str(tmp_path / "r"), "--quiet"]) == 2
    assert "unknown category 'bottle'" in capsys.readouterr().err
    assert main(["test", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.png" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epoch: 3\n")
    assert main(["train", "--config", str(cfg), "--data-root", "x"]) == 2
    assert "train.epoch" in capsys.readouterr().err


def test_import_official_checkpoint_then_test(trained, tmp_path):
    import torch

    from ddad.checkpoint import Checkpoint
    from ddad.diffusion.unet import UNet, UNetConfig

    root, _ = trained
    torch.manual_seed(0)
    model = UNet(UNetConfig.ddad_s(32, 3))
    official = tmp_path / "1000"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, official)
    run = tmp_path / "imported"
    assert main(["import", str(official), "--run-dir", str(run), "--model", "ddad-s", "--data-root",
                 str(root / "data"), "--category", "washer", "--image-size", "32", "--epoch", "1000",
                 "--set", "detect.scoring.mode=pixel", "--set", "detect.sampler.start_step=50",
                 "--set", "detect.sampler.skip=50"]) == 0
    ckpt = Checkpoint(RunDir(run).latest_checkpoint())
    assert ckpt.info["epoch"] == 1000
    stored, expected = ckpt.state_dict("model"), model.state_dict()
    assert stored.keys() == expected.keys()
    for name, tensor in expected.items():  # every tensor, bit for bit
        assert torch.equal(stored[name], tensor), name
    # the authors trained on every timestep: an imported model takes any T' (and adapts as they did)
    from ddad import load_config

    stored = load_config(run)
    assert stored.train.max_timestep is None and stored.adapt.train_batchnorm is True
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0
    assert (run / "test" / "metrics.json").is_file()
    # the run's detector reconstructs exactly as Algorithm 1 with the authors' network does
    from ddad import load_detector
    from ddad.diffusion.sampler import conditioned_denoise
    from ddad.diffusion.schedule import alphas_cumprod

    detector, config = load_detector(RunDir(run), calibrate=False, progress=False)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model.eval()
    with torch.no_grad():
        direct = conditioned_denoise(model, images, images, alphas_cumprod(config.schedule),
                                     config.detect.sampler, detector.seeds_for(images))
    assert torch.allclose(detector.reconstruct(images), direct, atol=1e-5)


def test_test_picks_a_checkpoint_and_names_a_missing_one(trained, capsys):
    _, run = trained
    first = RunDir(run).checkpoints()[0][1].name
    assert main(["test", str(run), "--quiet", "--no-images", "--checkpoint", first]) == 0
    assert main(["test", str(run), "--quiet", "--no-images", "--checkpoint", "epoch-09999.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "epoch-09999.safetensors" in err and first in err  # names the missing file and what there is
    # a T' above the trained range (the run trained t <= 250) is refused with the reason
    assert main(["test", str(run), "--quiet", "--no-images", "--start-step", "400"]) == 2
    assert "max_timestep = 250" in capsys.readouterr().err


def test_calibration_is_stored_reused_and_keyed(trained, monkeypatch, tmp_path):
    """Calibrated scoring (Eq. 9's maxima from good training images) runs once per setting, is kept in the
    run and reused, also where the training images are gone (a deployment machine)."""
    root, run = trained
    for old in (run / "calibration").glob("scale-*"):
        old.unlink()
    out = tmp_path / "t"  # other settings than the run's: written where told
    args = ["test", str(run), "--quiet", "--no-images", "--scoring", "combined", "--backbone", "mobilenet_v2",
            "--backbone-weights", "random", "--out", str(out)]
    assert main(args) == 0
    files = list((run / "calibration").glob("scale-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["scale"]["n_images"] == 5  # all five training images (one of six held out for validation)
    assert stored["scale"]["max_pixel"] > 0 and stored["scale"]["max_feature"] > 0
    first = json.loads((out / "metrics.json").read_text())

    def boom(*a, **k):
        raise AssertionError("a stored calibration must be reused")

    with monkeypatch.context() as m:
        m.setattr("ddad.methods.ddad.detector.Detector.calibrate", boom)
        assert main(args) == 0
        train_dir = root / "data" / "washer" / "train"
        train_dir.rename(tmp_path / "train")  # predict needs the training images no more
        try:
            assert main(["predict", str(run), str(root / "data" / "washer" / "test"), "--out",
                         str(tmp_path / "p"), "--quiet", "--no-images", "--scoring", "combined", "--backbone",
                         "mobilenet_v2", "--backbone-weights", "random"]) == 0
        finally:
            (tmp_path / "train").rename(train_dir)
        assert json.loads((out / "metrics.json").read_text())["image_auroc"] == first["image_auroc"]
        # per-image normalisation needs no calibration
        assert main(args + ["--normalization", "image"]) == 0
    assert main(args + ["--w", "5"]) == 0  # another setting, another calibration
    assert len(list((run / "calibration").glob("scale-*.json"))) == 2
    # the default (positional) keeps its per-pixel means beside the JSON; plain calibrated maxima need none
    maps = list((run / "calibration").glob("scale-*.safetensors"))
    assert len(maps) == 2 and all(m.with_suffix(".json").is_file() for m in maps)
    assert first["score_scale"]["positional"] is True
    assert main(args + ["--normalization", "calibrated"]) == 0
    assert len(list((run / "calibration").glob("scale-*.json"))) == 3
    assert len(list((run / "calibration").glob("scale-*.safetensors"))) == 2
    assert json.loads((out / "metrics.json").read_text())["score_scale"]["positional"] is False


def test_old_configs_keep_their_normalisation(tmp_path):
    from ddad import RunConfig

    for flag, expected in (("true", "batch"), ("false", "image")):
        path = tmp_path / f"{flag}.yaml"
        path.write_text(f"detect:\n  scoring:\n    normalize_over_batch: {flag}\n")
        assert RunConfig.from_yaml(path).detect.scoring.normalization == expected
    assert RunConfig().detect.scoring.normalization == "positional"


def test_predict_refuses_a_threshold_from_other_detection_settings(trained, tmp_path, capsys):
    """A threshold is stored under the calibration key of the settings ``ddad test`` ran with; predict with
    another w (or checkpoint, scoring, ...) refuses it, names what differs and the command that makes one."""
    root, run = trained
    data = root / "data" / "washer" / "test"
    (run / "threshold.json").unlink(missing_ok=True)  # earlier tests of the module stored other settings' records
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0
    stored = json.loads((run / "threshold.json").read_text())
    assert len(stored["calibration_key"]) == 16 and stored["key"]["settings"]["algorithm"]["sampler"]["w"] == 3.0
    ok = ["predict", str(run), str(data), "--quiet", "--no-images"]
    assert main(ok + ["--out", str(tmp_path / "a")]) == 0
    assert main(ok + ["--out", str(tmp_path / "b"), "--batch-size", "2"]) == 0  # runtime: same key
    first = RunDir(run).checkpoints()[0][1].name
    for flags, named in ((["--w", "5"], "sampler.w: 3.0 -> 5.0"), (["--checkpoint", first], "checkpoint"),
                         (["--sigma", "2"], "scoring.sigma"), (["--weights", "raw"], "weights.average")):
        assert main(ok + ["--out", str(tmp_path / "c")] + flags) == 2, flags
        err = capsys.readouterr().err
        assert named in err and f"ddad test {run}" in err and "--threshold" in err, err
        assert not (tmp_path / "c").exists()  # nothing written
    assert main(ok + ["--out", str(tmp_path / "d"), "--w", "5", "--threshold", "0.5"]) == 0  # explicit: fine
    assert main(["test", str(run), "--quiet", "--no-images", "--w", "5"]) == 0
    assert main(ok + ["--out", str(tmp_path / "e"), "--w", "5"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "e" / "scores.csv")))
    threshold = json.loads((run / "threshold.json").read_text())["threshold"]
    assert all(r["decision"] == ("defective" if float(r["score"]) >= threshold else "good") for r in rows)
    # a threshold.json written before thresholds had keys is refused too
    (run / "threshold.json").write_text(json.dumps({"threshold": 0.1, "source": "F1-optimal on the test split"}))
    assert main(ok + ["--out", str(tmp_path / "f"), "--w", "5"]) == 2
    assert "earlier ddad version" in capsys.readouterr().err
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0  # leaves a valid one for the other tests


def test_train_settings_take_precedence_in_order(tmp_path):
    """defaults < recipe < preset < YAML file (only the keys it sets) < flags < --set."""
    from ddad.cli import build_parser, train_settings as _train_config
    from ddad.methods.ddad.presets import get_setting

    def parse(*argv, yaml_text=None):
        args = ["train", "--data-root", "d", *argv]
        if yaml_text is not None:
            path = tmp_path / "c.yaml"
            path.write_text(yaml_text)
            args += ["--config", str(path)]
        return _train_config(build_parser().parse_args(args))[0]

    leather = get_setting("mvtec", "leather")
    # the case: a file that sets only train.epochs keeps the preset's w, adaptation epochs and Adam
    c = parse("--preset", "mvtec", "--category", "leather", yaml_text="train: {epochs: 5}\n")
    assert c.train.epochs == 5 and c.detect.sampler.w == leather.w == 11 and c.adapt.epochs == 8
    assert c.train.optimizer == "adam" and c.train.lr == 3e-4  # the paper's recipe, which the preset implies
    # recipe > defaults
    assert parse("--recipe", "paper").train.lr == 3e-4 and parse().train.lr == 1e-3
    # preset > recipe: the preset's epochs and batch size over the default recipe's
    c = parse("--recipe", "default", "--preset", "mvtec", "--category", "leather")
    assert c.train.epochs == 2000 and c.train.optimizer == "adamw" and c.detect.sampler.w == 11
    # file > preset
    c = parse("--preset", "mvtec", "--category", "leather", yaml_text="detect: {sampler: {w: 2}}\n")
    assert c.detect.sampler.w == 2 and c.train.epochs == 2000
    # flags > file
    c = parse("--epochs", "7", yaml_text="train: {epochs: 5, lr: 0.002}\n")
    assert c.train.epochs == 7 and c.train.lr == 0.002
    # --set > flags
    c = parse("--epochs", "7", "--set", "train.epochs=9", yaml_text="train: {epochs: 5}\n")
    assert c.train.epochs == 9
    # a file in the 0.1.0 layout (runtime keys under detect) still works
    c = parse(yaml_text="detect: {batch_size: 3, backbone_weights: random, device: cpu}\n")
    assert c.runtime.batch_size == 3 and c.runtime.device == "cpu" and c.weights.backbone_weights == "random"


def test_exported_graphs_give_the_same_scores_and_labels(trained, tmp_path):
    """`--backend onnxruntime` (the run's loop, the exported graphs): raw scores within 1e-4 relative of PyTorch,
    and pred_score and pred_label equal, each with the threshold its own `ddad test` chose on the validation split."""
    root, run = trained
    data = root / "data" / "washer" / "test"
    flags = ["--scoring", "combined", "--backbone", "resnet18", "--backbone-weights", "random"]
    assert main(["export", str(run), *flags]) == 0
    assert (run / "export" / "unet.onnx").is_file() and (run / "export" / "extractor.onnx").is_file()
    info = json.loads((run / "export" / "export.json").read_text())  # paths stored absolute, as the README says
    assert Path(info["run"]).is_absolute() and Path(info["run"]) == run.resolve()
    assert Path(info["checkpoint"]).is_absolute() and Path(info["checkpoint"]).is_file()
    rows = {}
    for backend in ("torch", "onnxruntime"):
        assert main(["test", str(run), "--quiet", "--no-images", "--out", str(tmp_path / f"t-{backend}"), *flags,
                     "--backend", backend]) == 0
        assert main(["predict", str(run), str(data), "--out", str(tmp_path / backend), "--quiet", "--no-images",
                     *flags, "--backend", backend]) == 0
        rows[backend] = {r["image"]: r for r in csv.DictReader(open(tmp_path / backend / "scores.csv"))}
        stored = json.loads((run / "threshold.json").read_text())
    assert rows["torch"].keys() == rows["onnxruntime"].keys()
    # pred_score divides the raw differences (score and threshold) by the validation score range: its tolerance
    low, high = stored["validation_range"]
    for image, a in rows["torch"].items():
        b = rows["onnxruntime"][image]
        assert float(b["score"]) == pytest.approx(float(a["score"]), rel=1e-4), image
        tolerance = 2e-4 * (abs(float(a["score"])) + abs(stored["threshold"])) / (high - low) + 1e-9
        assert float(b["pred_score"]) == pytest.approx(float(a["pred_score"]), abs=tolerance), image
        assert 0.0 <= float(a["pred_score"]) <= 1.0
        if abs(float(a["pred_score"]) - 0.5) > 1e-3:  # away from the threshold the decisions agree
            assert a["pred_label"] == b["pred_label"], image


def test_help_and_counts_say_what_the_code_does(capsys):
    """Issue 28, wall 12: the help of --method and --category matches what training does with several
    categories; counts are singular for one."""
    import pytest

    from ddad.cli.commands import count

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "so far" not in text and "refuse" not in text
    assert "ddad trains one run per category" in text and "drdc one model for all of them" in text
    assert (count(1, "image"), count(2, "image"), count(0, "image")) == ("1 image", "2 images", "0 images")
