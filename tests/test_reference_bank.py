"""DDAD with a memory bank as Eq. 8's reference (``scoring.reference: bank``): D_f is 1 - cos to the nearest
training patch of each stage (brute force below), fused by Eq. 9 with the pixel distance to the diffusion's
reconstruction, its maxima from held-out images; the banks are fitted once and kept in the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddad import load_config, with_detection
from ddad.cli import main
from ddad.data.formats import build_index
from ddad.data.io import read_image
from ddad.methods import get_method
from ddad.runs import RunDir
from ddad.scoring import bank_feature_distance, reference_patches


def _local_mean(f: np.ndarray) -> np.ndarray:
    """(C, h, w): each position's mean over its 3 x 3 neighbours inside the map, by loops."""
    c, h, w = f.shape
    out = np.zeros_like(f)
    for y in range(h):
        for x in range(w):
            out[:, y, x] = f[:, max(0, y - 1):y + 2, max(0, x - 1):x + 2].mean(axis=(1, 2))
    return out


def _brute_force(queries: list[torch.Tensor], training: list[torch.Tensor], size) -> torch.Tensor:
    """sum over stages of min over every training patch of 1 - cos, upsampled (Eq. 8 with the bank)."""
    total = 0
    for fq, ft in zip(queries, training):
        q = np.stack([_local_mean(f) for f in fq.double().numpy()])  # (B, C, h, w)
        t = np.stack([_local_mean(f) for f in ft.double().numpy()])
        t = t.transpose(0, 2, 3, 1).reshape(-1, t.shape[1])
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        b, c, h, w = q.shape
        qq = q.transpose(0, 2, 3, 1).reshape(-1, c)
        qq = qq / np.linalg.norm(qq, axis=1, keepdims=True)
        d = (1 - qq @ t.T).min(axis=1).reshape(b, 1, h, w)
        total = total + F.interpolate(torch.from_numpy(d).float(), size=size, mode="bilinear", align_corners=False)
    return total


def test_the_bank_distance_is_eq_8_against_the_nearest_training_patch():
    g = torch.Generator().manual_seed(0)
    queries = [torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 6, 3, 3, generator=g)]
    training = [torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 6, 3, 3, generator=g)]
    got = bank_feature_distance(queries, reference_patches(training, 3), (10, 10), 3)
    assert torch.allclose(got, _brute_force(queries, training, (10, 10)), atol=1e-5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from ddad.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("refbank") / "data"
    generate(root, SynthConfig(size=32, train=10, test_good=3, test_defective_per_type=1, categories=("washer",)))
    run = root.parent / "run"
    assert main(["train", "--data-root", str(root), "--category", "washer", "--image-size", "32", "--model", "tiny",
                 "--epochs", "1", "--batch-size", "4", "--val-ratio", "0.3", "--backbone", "mobilenet_v2",
                 "--backbone-weights", "random", "--quiet", "--run-dir", str(run)]) == 0
    return run


def test_ddad_scores_against_the_bank_and_calibrates_eq_9_on_held_out_images(run):
    config = with_detection(load_config(run), mode="combined", normalization="calibrated", reference="bank",
                            bank_fraction=1.0)
    loaded = get_method("ddad").load(RunDir(run), config, progress=False)
    detector = loaded.detect
    index = build_index(config.data)
    layers = config.detect.scoring.feature_layers

    def features(samples):
        images = torch.stack([read_image(s.image, 3, 32) for s in samples])
        with torch.no_grad():
            return images, detector.extractor(images, layers)

    _, training = features(index.train)
    test_images, test_feats = features(index.test)
    result = detector(test_images)
    assert torch.allclose(result.extras["feature_distance"], _brute_force(test_feats, training, (32, 32)), atol=1e-4)
    # Eq. 9's maxima from the held-out validation images, none of which is in the bank
    held = [s for s in index.val if s.label == 0]
    assert held and not {s.image for s in held} & {s.image for s in index.train}
    _, held_feats = features(held)
    assert detector.score_scale.max_feature == pytest.approx(
        float(_brute_force(held_feats, training, (32, 32)).amax()), rel=1e-4)
    # the banks are kept in the run: loading again fits nothing, and a coreset keeps its share
    banks = sorted((run / "banks").glob("reference-*.safetensors"))
    assert len(banks) == len(layers)
    stamps = [b.stat().st_mtime_ns for b in banks]
    get_method("ddad").load(RunDir(run), config, progress=False)
    assert [b.stat().st_mtime_ns for b in banks] == stamps
    from ddad.memory_bank import load_bank

    half = get_method("ddad").load(RunDir(run), with_detection(config, bank_fraction=0.5), progress=False).detect
    for bank, (full, facts) in zip(half.reference_banks, (load_bank(b) for b in banks)):
        assert len(bank) == round(0.5 * facts["patches"]) and len(full) == facts["patches"]


def test_tune_takes_the_bank_reference_among_its_candidates(run):
    assert main(["tune", str(run), "--quiet", "--grid", "reference=reconstruction,bank", "--defect-seeds", "0,1,2"]) == 0
    tuned = json.loads((run / "tune.json").read_text())
    assert sorted(r["reference"] for r in tuned["rows"]) == ["bank", "reconstruction"]
    assert tuned["chosen"]["reference"] == max(tuned["rows"], key=lambda r: r["objective"])["reference"]
    from ddad.engine.tuning import GRIDS

    assert any(grid.get("reference") == ("bank",) for grid in GRIDS["ddad"])
