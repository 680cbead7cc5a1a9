"""PatchCore as a method: banks per category (never consulted across categories), distances against brute
force, the coreset's size, resuming an interrupted fit, and test / predict through the engine."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ddad import load_config
from ddad.cli import main
from ddad.data.splits import load_test_split
from ddad.methods import get_method
from ddad.runs import RunDir

from .conftest import interrupt_on_call


def _train(root, run, *extra) -> int:
    return main(["train", "--method", "patchcore", "--data-root", str(root), "--category", "stripes,washer",
                 "--image-size", "32", "--backbone", "mobilenet_v2", "--backbone-weights", "random",
                 "--set", "bank.fraction=0.25", "--run-dir", str(run), "--quiet", *extra])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synth_root):
    run = tmp_path_factory.mktemp("patchcore") / "run"
    assert _train(synth_root, run) == 0
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0
    return run


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from ddad.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("pcdata") / "data"
    generate(root, SynthConfig(size=32, train=16, test_good=4, test_defective_per_type=2, seed=1))
    return root


def _reference_features(extractor, images: torch.Tensor) -> torch.Tensor:
    """Sec. 3.1 written out: stages 2 and 3, 3 x 3 means over the pixels inside the image, stage 3
    upsampled to stage 2's grid, concatenated; as (B, h * w, D)."""
    s2, s3 = extractor(images, (2, 3))
    ones = torch.ones(1, 1, *s2.shape[-2:]), torch.ones(1, 1, *s3.shape[-2:])
    mean = [F.conv2d(F.pad(s, (1, 1, 1, 1)), torch.ones(s.shape[1], 1, 3, 3), groups=s.shape[1])
            / F.conv2d(F.pad(o, (1, 1, 1, 1)), torch.ones(1, 1, 3, 3)) for s, o in zip((s2, s3), ones)]
    up = F.interpolate(mean[1], size=s2.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([mean[0], up], dim=1).flatten(2).transpose(1, 2)


def test_each_image_is_scored_against_its_own_categorys_bank_only(fitted):
    run = RunDir(fitted)
    config = load_config(fitted)
    loaded = get_method("patchcore").load(run, config, progress=False)
    detector = loaded.detect
    banks = {c: load_file(str(fitted / "banks" / f"{c}.safetensors"))["bank"] for c in ("stripes", "washer")}
    split = load_test_split(config.data, progress=False)
    categories = [s.category for s in split.samples]
    result = loaded.score_split(split, progress=False)
    feats = _reference_features(detector.extractor, split.images.float())
    for i, category in enumerate(categories):  # brute-force nearest neighbours in the image's own bank
        d = torch.cdist(feats[i].double(), banks[category].double()).amin(dim=1)
        assert np.allclose(result.extras["patch_distance"][i].flatten().numpy(), d.numpy(), rtol=1e-4, atol=1e-4), i
    # the other category's bank is never consulted: replaced by the queries themselves, nothing changes
    detector.banks["washer"] = feats[[i for i, c in enumerate(categories) if c == "stripes"]].reshape(-1, feats.shape[-1])
    again = loaded.score_split(split, progress=False)
    stripes = torch.tensor([c == "stripes" for c in categories])
    assert torch.equal(again.score[stripes], result.score[stripes])
    # an image of unknown category gets the nearest patch of any bank
    unknown = detector(split.images[:1].float()).extras["patch_distance"][0].flatten()
    both = torch.cat([banks["stripes"].double(), detector.banks["washer"].double()])
    assert np.allclose(unknown.numpy(), torch.cdist(feats[0].double(), both).amin(dim=1).numpy(), atol=1e-4)


def test_a_bank_keeps_its_fraction_of_the_patches_and_the_run_tests_and_predicts(fitted, synth_root, tmp_path):
    from ddad.memory_bank import load_bank

    for category in ("stripes", "washer"):
        bank, facts = load_bank(fitted / "banks" / f"{category}.safetensors")
        assert facts["patches"] == facts["images"] * 16  # 4 x 4 patches of each 32-px image
        assert len(bank) == round(0.25 * facts["patches"])
    metrics = json.loads((fitted / "test" / "metrics.json").read_text())
    assert set(metrics["categories"]) == {"stripes", "washer"}
    rows = {r["image"]: float(r["score"]) for r in csv.DictReader(open(fitted / "test" / "scores.csv"))}
    folder = synth_root / "washer" / "test"
    assert main(["predict", str(fitted), str(folder), "--quiet", "--no-images", "--out", str(tmp_path / "p")]) == 0
    predicted = list(csv.DictReader(open(tmp_path / "p" / "scores.csv")))
    assert predicted and all(r["pred_label"] in ("0", "1") and r["pred_score"] for r in predicted)
    # predict does not know the category: the nearest patch of any bank, never farther than its own bank's
    for r in predicted:
        assert float(r["score"]) <= rows[r["image"]] + 1e-6


def test_an_interrupted_fit_resumes_to_the_same_banks_and_scores(synth_root, tmp_path, monkeypatch, fitted):
    import ddad.memory_bank as memory_bank

    run = tmp_path / "run"
    # Ctrl-C while choosing the second category's coreset
    real = interrupt_on_call(monkeypatch, memory_bank, "greedy_coreset", 2)
    assert _train(synth_root, run) == 130
    kept = run / "banks" / "stripes.safetensors"
    assert kept.is_file() and not (run / "banks" / "washer.safetensors").exists()
    stamp = kept.stat().st_mtime_ns
    monkeypatch.setattr(memory_bank, "greedy_coreset", real)
    assert _train(synth_root, run) == 2  # a fresh fit into a run with banks is refused
    assert main(["test", str(run), "--quiet", "--no-images"]) == 2  # the missing bank is named
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet"]) == 0
    assert kept.stat().st_mtime_ns == stamp  # kept, not fitted again
    for category in ("stripes", "washer"):
        a = load_file(str(run / "banks" / f"{category}.safetensors"))["bank"]
        b = load_file(str(fitted / "banks" / f"{category}.safetensors"))["bank"]
        assert torch.equal(a, b), category
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0
    scores = [float(r["score"]) for r in csv.DictReader(open(run / "test" / "scores.csv"))]
    reference = [float(r["score"]) for r in csv.DictReader(open(fitted / "test" / "scores.csv"))]
    assert scores == pytest.approx(reference, rel=1e-6)
