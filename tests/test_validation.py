"""Decisions without test labels: the validation split, synthetic anomalies, thresholds for a false-alarm
target, normalised scores, and a test that never reads a test image while it chooses them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import beta, norm

from ddad.cli import main
from ddad.data.anomalies import SyntheticAnomalies, perlin_noise
from ddad.data.formats import DataConfig, build_index
from ddad.engine.thresholds import (Threshold, choose_threshold, decision_stats, false_alarm_interval,
                                   false_alarm_threshold)

from .conftest import forbid_reading


def test_synthetic_anomalies_follow_the_seed_and_their_masks_are_the_changed_pixels():
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    a, ma = SyntheticAnomalies(seed=3).apply(images)
    b, mb = SyntheticAnomalies(seed=3).apply(images)
    c, _ = SyntheticAnomalies(seed=4).apply(images)
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(a, c)
    changed = (a != images).any(dim=1, keepdim=True).float()
    assert torch.equal(ma, changed) and torch.all(ma.sum(dim=(1, 2, 3)) > 0)  # exactly the changed pixels, never none
    for kind in ("perlin", "paste"):
        out, m = SyntheticAnomalies(kinds=(kind,), seed=0).apply(images)
        assert torch.equal(m, (out != images).any(dim=1, keepdim=True).float())
    single, m1 = SyntheticAnomalies().apply(images[:1])
    assert m1.sum() > 0
    # an image's anomaly depends on the seed and the image alone: the same in a subset and in another order
    order = torch.tensor([5, 2, 7, 0])
    subset, subset_masks = SyntheticAnomalies(seed=3).apply(images[order])
    assert torch.equal(subset, a[order]) and torch.equal(subset_masks, ma[order])
    assert torch.equal(single, SyntheticAnomalies().apply(images)[0][:1])
    # a uniform image (no texture of its own to paste or blend) still gets a defect, and exact masks
    uniform = torch.stack([torch.zeros(3, 32, 32), torch.full((3, 32, 32), 0.5), torch.full((3, 32, 32), -1.0)])
    out, m = SyntheticAnomalies(seed=0).apply(uniform)
    assert torch.all(m.sum(dim=(1, 2, 3)) > 0) and torch.equal(m, (out != uniform).any(dim=1, keepdim=True).float())
    noise = perlin_noise(40, 24, (4, 2), np.random.default_rng(0))
    assert noise.shape == (40, 24) and np.abs(noise).max() <= 1.5 and noise.std() > 0.05


def test_the_false_alarm_rate_on_fresh_good_images_is_within_binomial_bounds_of_the_target():
    rng = np.random.default_rng(0)
    n, target = 2000, 0.05
    for trial in range(5):
        val = rng.standard_normal(n)
        threshold = false_alarm_threshold(val, target)
        assert (val >= threshold).mean() <= target  # on the validation images: at most the target
        k = int(np.floor(target * n))
        true_rate = norm.sf(threshold)  # the threshold is the (k+1)-th largest: true rate ~ Beta(k+1, n-k)
        assert beta.ppf(0.0005, k + 1, n - k) <= true_rate <= beta.ppf(0.9995, k + 1, n - k), trial
        fresh = rng.standard_normal(50_000)
        rate = (fresh >= threshold).mean()
        sd = np.sqrt(true_rate * (1 - true_rate) / fresh.size)
        assert abs(rate - true_rate) < 4 * sd and abs(rate - target) < 0.015, (trial, rate)
    assert false_alarm_threshold([1.0, 2.0, 3.0], 0.0) > 3.0  # no false alarm allowed: above every good score
    assert false_alarm_threshold([1.0, 2.0, 2.0, 3.0], 0.5) == np.nextafter(2.0, 3)  # ties stay below


def test_normalised_scores_are_one_half_at_the_threshold_and_monotone():
    t = choose_threshold([0.1, 0.2, 0.3, 0.9, 1.0], [0, 0, 0, 1, 1])
    assert 0.3 < t.value <= 0.9 and t.target == {"f1": "validation defects (real)"}
    assert t.normalise(t.value) == 0.5
    s = np.linspace(-2, 3, 501)
    p = t.normalise(s)
    assert np.all(np.diff(p) >= 0) and p.min() == 0.0 and p.max() == 1.0
    assert np.array_equal(t.label(s), p >= 0.5)  # the normalised decision is the raw one
    stats = decision_stats([0.1, 0.5, 0.95, 0.2], [0, 0, 1, 1], 0.4)
    assert stats["false_alarm_rate"] == 0.5 and stats["miss_rate"] == 0.5 and stats["precision"] == 0.5
    restored = Threshold(**json.loads(json.dumps(t.to_dict())))
    assert restored.normalise(0.7) == t.normalise(0.7)


def test_the_validation_split_is_held_out_seeded_and_per_category(synth_root):
    base = DataConfig(root=str(synth_root), category="stripes,washer", image_size=32)
    index = build_index(base)
    none = build_index(DataConfig(root=str(synth_root), category="stripes,washer", image_size=32, val_ratio=0))
    train, val = {s.image for s in index.train}, {s.image for s in index.val}
    assert not train & val and train | val == {s.image for s in none.train}
    assert {s.category for s in index.val} == {"stripes", "washer"}  # every category holds some out
    assert [s.image for s in build_index(base).val] == [s.image for s in index.val]
    other = build_index(DataConfig(root=str(synth_root), category="stripes,washer", image_size=32, seed=5))
    assert {s.image for s in other.val} != val


def test_without_real_defects_the_default_threshold_is_a_one_percent_false_alarm_target():
    rng = np.random.default_rng(1)
    good, bad = rng.random(40), rng.random(6) + 0.5
    scores, labels = np.concatenate([good, bad]), np.r_[np.zeros(40), np.ones(6)]
    synthetic = choose_threshold(scores, labels, defects="synthetic")
    assert synthetic.value == np.nextafter(good.max(), np.inf)  # 40 < 100 images: above every good one
    assert synthetic.target["max_false_alarms"] == 0.01 and synthetic.target["default"] is True
    assert "synthetic ones ignored" in synthetic.source
    real = choose_threshold(scores, labels, defects="real")  # F1 only with real defects
    assert real.target == {"f1": "validation defects (real)"} and real.value != synthetic.value
    many = rng.random(250)  # floor(0.01 * 250) = 2 false alarms allowed: just above the third largest
    assert choose_threshold(many, np.zeros(250)).value == np.nextafter(np.sort(many)[-3], np.inf)
    given = choose_threshold(scores, labels, max_false_alarms=0.05, defects="synthetic")
    assert given.target["max_false_alarms"] == 0.05 and "default" not in given.target
    pixels = choose_threshold(scores, labels, defects="synthetic", unit="pixels")
    assert "good validation pixels" in pixels.source and "interval_95" not in pixels.target
    # the stated expectation and 95 % interval of the false-alarm rate on new good parts, by simulation: with
    # good scores uniform on [0, 1], the share of new good parts at or above the threshold t is 1 - t
    expected, low, high = synthetic.target["expected_false_alarms"], *synthetic.target["interval_95"]
    assert synthetic.target["good_images"] == 40
    shares = np.array([1 - choose_threshold(rng.random(40), np.zeros(40)).value for _ in range(4000)])
    assert abs(shares.mean() - expected) < 4 * shares.std() / np.sqrt(shares.size)
    assert 0.93 < ((shares >= low) & (shares <= high)).mean() < 0.97
    assert (shares < low).mean() == pytest.approx(0.025, abs=0.01)  # central: 2.5 % on each side
    e, lo, hi = false_alarm_interval(250, 0.01)
    shares = np.array([1 - false_alarm_threshold(rng.random(250), 0.01) for _ in range(4000)])
    assert abs(shares.mean() - e) < 4 * shares.std() / np.sqrt(shares.size)
    assert 0.93 < ((shares >= lo) & (shares <= hi)).mean() < 0.97


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synth_root):
    run = tmp_path_factory.mktemp("val") / "run"
    assert main(["train", "--data-root", str(synth_root), "--category", "washer", "--image-size", "32", "--model",
                 "tiny", "--epochs", "2", "--batch-size", "4", "--val-ratio", "0.25", "--backbone", "mobilenet_v2",
                 "--backbone-weights", "random", "--quiet", "--run-dir", str(run)]) == 0  # the same with or without ../shared
    return run


def test_no_test_image_is_read_while_the_threshold_is_chosen(tiny_run, monkeypatch):
    from ddad import load_config
    from ddad.data import dataset
    from ddad.engine.testing import validation_thresholds
    from ddad.methods import get_method
    from ddad.runs import RunDir

    config = load_config(tiny_run)
    test_files = {str(s.image) for s in build_index(config.data).test}
    real_read = dataset.read_image
    read = []

    def guarded(path, *args, **kwargs):
        assert str(path) not in test_files, f"test image {path} read while choosing the threshold"
        read.append(str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(dataset, "read_image", guarded)
    loaded = get_method(config.method).load(RunDir(tiny_run), config, progress=False)
    decisions = validation_thresholds(RunDir(tiny_run), loaded, max_false_alarms=0.0, progress=False)
    image, pixel = decisions.shared.image, decisions.shared.pixel
    assert not decisions.categories  # one category: the shared decision only
    assert read and image.target["max_false_alarms"] == 0.0 and pixel is not None
    monkeypatch.setattr(dataset, "read_image", real_read)
    assert main(["test", str(tiny_run), "--quiet", "--no-images", "--max-false-alarms", "0"]) == 0
    metrics = json.loads((tiny_run / "test" / "metrics.json").read_text())
    assert metrics["threshold"] == image.value and "on 2 good validation images" in metrics["threshold_source"]
    assert metrics["decision"]["target"]["max_false_alarms"] == 0.0
    assert "oracle_threshold" in metrics and metrics["oracle_threshold"]["source"] == "F1-optimal on the test split"


def test_predict_writes_normalised_scores_labels_and_masks(tiny_run, synth_root, tmp_path, capsys):
    from ddad import load_config
    from ddad.data.splits import load_validation_split
    from ddad.methods import get_method
    from ddad.runs import RunDir

    assert main(["test", str(tiny_run), "--quiet", "--no-images"]) == 0  # synthetic validation defects only
    stored = json.loads((tiny_run / "threshold.json").read_text())
    assert "synthetic" in stored["source"] and stored["pixel_threshold"] is not None
    # the default without real defects: 1 % false alarms on the good validation images (fewer than 100 of
    # them: just above the highest good validation score, scored here by hand)
    config = load_config(tiny_run)
    loaded = get_method("ddad").load(RunDir(tiny_run), config, progress=False)
    val = load_validation_split(config.data, progress=False)
    good_scores = loaded.detect(val.images[val.labels == 0]).score.numpy()
    assert stored["target"]["max_false_alarms"] == 0.01 and stored["target"]["default"] is True
    assert stored["threshold"] == pytest.approx(good_scores.max(), rel=1e-5)  # batches of other sizes here
    assert stored["threshold"] > np.sort(good_scores)[-2] + 1e-3
    capsys.readouterr()
    out = tmp_path / "pred"
    folder = synth_root / "washer" / "test"
    assert main(["predict", str(tiny_run), str(folder), "--out", str(out), "--masks", "--quiet"]) == 0
    # predict says which threshold decided and how it was chosen; scores.csv carries both
    assert f"threshold {stored['threshold']:.6g}: {stored['source']}" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert {r["threshold_source"] for r in rows} == {stored["source"]}
    t = Threshold(stored["threshold"], stored["source"], stored["target"], *stored["validation_range"])
    for r in rows:
        score = float(r["score"])
        assert float(r["pred_score"]) == pytest.approx(float(t.normalise(score)))
        assert int(r["pred_label"]) == int(score >= t.value) == int(float(r["pred_score"]) >= 0.5)
    masks = sorted((out / "masks").rglob("*.png"))
    assert len(masks) == len(rows) and {str(m.relative_to(out)) for m in masks} == {r["mask"] for r in rows}
    from ddad.data.io import read_image

    first = loaded.detect(read_image(rows[0]["image"], 3, 32)[None])
    expected = (first.anomaly_map[0, 0].numpy() >= stored["pixel_threshold"]) * 255
    got = np.asarray(Image.open(out / rows[0]["mask"]))
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_the_python_api_decides_as_anomalib_and_as_predict(tiny_run, synth_root, tmp_path):
    """ddad.load_model(run)(images): the raw score under `score`, pred_score normalised with 0.5 at the stored
    threshold (min-max over the validation range, written out here), pred_label and pred_mask from the stored
    thresholds, and the same figures as `ddad predict` writes (issue 28, wall 4)."""
    from ddad import load_config, load_model
    from ddad.data.io import read_image
    from ddad.methods import get_method
    from ddad.runs import RunDir

    assert main(["test", str(tiny_run), "--quiet", "--no-images"]) == 0
    stored = json.loads((tiny_run / "threshold.json").read_text())
    value, (low, high) = stored["threshold"], stored["validation_range"]
    tested = list(csv.DictReader(open(tiny_run / "test" / "scores.csv")))  # ddad test's rows carry them too
    for r in tested:
        score = float(r["score"])
        assert float(r["pred_score"]) == pytest.approx(min(max((score - value) / (high - low) + 0.5, 0), 1))
        assert int(r["pred_label"]) == int(score >= value)
    assert {r["pred_label"] for r in tested} == {"0", "1"}
    files = sorted((synth_root / "washer" / "test").rglob("*.png"))[:6]
    images = torch.stack([read_image(f, 3, 32) for f in files])
    model = load_model(tiny_run)
    result = model(images)
    raw = get_method("ddad").load(RunDir(tiny_run), load_config(tiny_run), progress=False).detect(images)
    assert torch.allclose(result.score, raw.score, rtol=1e-5) and torch.equal(result.anomaly_map, raw.anomaly_map)
    expected = np.clip((raw.score.double().numpy() - value) / (high - low) + 0.5, 0, 1)
    assert result.pred_score.dtype == torch.float32 and np.allclose(result.pred_score.numpy(), expected, atol=1e-6)
    assert result.pred_label.tolist() == (raw.score.double().numpy() >= value).tolist()
    assert torch.equal(result.pred_mask, raw.anomaly_map.double() >= stored["pixel_threshold"])
    assert result.pred_mask.any()
    # as predict writes them
    assert main(["predict", str(tiny_run), *map(str, files), "--out", str(tmp_path / "pred"), "--quiet",
                 "--no-images"]) == 0
    rows = {r["image"]: r for r in csv.DictReader(open(tmp_path / "pred" / "scores.csv"))}
    for f, s, label in zip(files, result.pred_score.tolist(), result.pred_label.tolist()):
        assert float(rows[str(f)]["pred_score"]) == pytest.approx(s, abs=1e-5) and int(rows[str(f)]["pred_label"]) == label
    # a threshold by hand decides but cannot normalise; a wrong shape or category is an error that says so
    given = load_model(tiny_run, threshold=float(np.median(raw.score.numpy())))(images)
    assert given.pred_score is None and given.pred_label.sum() == 3 and given.pred_mask is None
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        model(images[:, :1])
    with pytest.raises(ValueError, match="not one of this run's"):
        model(images[:1], ["bottle"])


def test_without_a_validation_split_the_test_threshold_is_labelled_an_oracle(synth_root, tmp_path):
    from ddad.engine.testing import THRESHOLD_SOURCE

    run = tmp_path / "run"
    assert main(["train", "--data-root", str(synth_root), "--category", "washer", "--image-size", "32", "--model",
                 "tiny", "--epochs", "1", "--batch-size", "4", "--val-ratio", "0", "--quiet", "--run-dir", str(run)]) == 0
    assert main(["test", str(run), "--quiet", "--no-images", "--report"]) == 0
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert metrics["threshold_source"] == THRESHOLD_SOURCE and "decision" not in metrics
    assert metrics["threshold"] == metrics["oracle_threshold"]["threshold"]
    assert "optimistic" in (run / "report" / "index.html").read_text()


def test_tune_chooses_on_validation_only_and_stores_the_best(tiny_run, monkeypatch, tmp_path, capsys):
    import shutil

    from scipy.stats import mannwhitneyu

    from ddad import load_config
    from ddad.data.splits import load_validation_split
    from ddad.methods import get_method
    from ddad.runs import RunDir

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = load_config(run)
    forbid_reading(monkeypatch, [s.image for s in build_index(config.data).test], "while tuning")
    assert main(["tune", str(run), "--grid", "mode=pixel,combined", "--grid", "v=0.5,2.0", "--quiet",
                 "--max-false-alarms", "0"]) == 0
    stored = json.loads((run / "tune.json").read_text())
    rows = stored["rows"]
    assert len(rows) == 5 and rows[0] == {**rows[0], "mode": "combined", "v": 1.0}  # the run's own settings first
    # every row's objective, recomputed with scipy on the validation split (synthetic defects drawn with the
    # seeds 0, 1, 2, ... : as many as it takes for one defect per held-out good image and seed to make at least
    # 64 defects) from the detector it names, overall and per seed
    held = sum(1 for s in build_index(config.data).val if s.label == 0)
    seeds = tuple(range(max(3, -(-64 // held))))
    assert len(seeds) > 3  # a few held-out images: more seeds than the three
    split = load_validation_split(config.data, progress=False, seeds=seeds)
    assert int(split.labels.sum()) == held * len(seeds) >= 64
    from ddad import with_detection
    from ddad.data.anomalies import synthetic_origin

    seed_of = np.array([-1 if synthetic_origin(s) is None else synthetic_origin(s)[1] for s in split.samples])
    for row in rows:
        loaded = get_method("ddad").load(RunDir(run), with_detection(config, mode=row["mode"], v=row["v"]),
                                         progress=False)
        scores = loaded.detect(split.images).score.numpy()
        good, bad = scores[split.labels == 0], scores[split.labels == 1]
        assert row["image_auroc"] == pytest.approx(mannwhitneyu(bad, good).statistic / (len(bad) * len(good)))
        assert sorted(row["seeds"], key=int) == [str(k) for k in seeds]
        for seed in seeds:
            bad = scores[seed_of == seed]
            assert row["seeds"][str(seed)]["image_auroc"] == pytest.approx(
                mannwhitneyu(bad, good).statistic / (len(bad) * len(good)))
    # the rule: the best on the mean over seeds replaces the run's settings only if its gain beats its spread
    per_seed = np.array([[r["seeds"][str(k)]["objective"] for k in seeds] for r in rows])
    top = int(per_seed.mean(axis=1).argmax())
    gain = per_seed[top] - per_seed[0]
    best = rows[top] if gain.mean() > gain.std(ddof=1) / np.sqrt(len(seeds)) else rows[0]
    assert stored["rule"]["spread_over_seeds"] == pytest.approx(gain.std(ddof=1))
    assert stored["rule"]["standard_error"] == pytest.approx(gain.std(ddof=1) / np.sqrt(len(seeds)))
    assert stored["rule"]["defects"] == {"synthetic": int(split.labels.sum()), "seeds": list(seeds)}
    printed = capsys.readouterr().out  # and the user is told which defects were used
    assert f"validation defects: {int(split.labels.sum())} synthetic, seeds {', '.join(map(str, seeds))}" in printed
    tuned = load_config(run)
    assert (tuned.detect.scoring.mode, tuned.detect.scoring.v) == (best["mode"], best["v"])
    assert stored["chosen"] == {"mode": best["mode"], "v": best["v"]}
    # the tuned settings' threshold is stored for predict: just above every good validation score (target 0;
    # equal up to float32 noise, as these scores come from another batch than tune's)
    loaded = get_method("ddad").load(RunDir(run), tuned, progress=False)
    good = split.images[torch.from_numpy(split.labels == 0)]
    good_scores = loaded.detect(good).score.numpy().astype(np.float64)
    threshold = json.loads((run / "threshold.json").read_text())
    assert threshold["calibration_key"] == loaded.key.digest
    assert threshold["threshold"] == pytest.approx(good_scores.max(), rel=1e-5)
    assert threshold["target"]["max_false_alarms"] == 0.0 == stored["threshold"]["target"]["max_false_alarms"]
    # predict decides with it, no ddad test needed: the lowest-scoring held-out good image is good
    held_out = [s.image for s in split.samples if s.label == 0]
    assert len(held_out) == len(good_scores)
    lowest = held_out[int(good_scores.argmin())]
    assert main(["predict", str(run), str(lowest), "--out", str(tmp_path / "pred"), "--no-images", "--quiet"]) == 0
    with open(tmp_path / "pred" / "scores.csv") as f:
        (predicted,) = list(csv.DictReader(f))
    assert float(predicted["score"]) == pytest.approx(good_scores.min(), rel=1e-5)
    assert predicted["pred_label"] == "0" and float(predicted["pred_score"]) < 0.5
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare)
    text = (bare / "config.yaml").read_text().replace("val_ratio: 0.25", "val_ratio: 0.0")
    (bare / "config.yaml").write_text(text)
    assert main(["tune", str(bare), "--quiet"]) == 2  # no validation split: an error with the remedy


def test_tune_keeps_the_best_candidate_and_the_earlier_one_on_ties(tiny_run, monkeypatch):
    from ddad import load_config, with_detection
    from ddad.engine import tuning
    from ddad.runs import RunDir

    values = {(0.5,): 0.6, (1.0,): 0.7, (2.0,): 0.9, (3.0,): 0.9, (4.0,): 0.2}
    monkeypatch.setattr(tuning, "validation_score", lambda loaded, split: {
        "image_auroc": None, "pixel_auroc": None, "objective": values[(loaded,)]})
    config = with_detection(load_config(tiny_run), v=1.0)
    best, rows, rule = tuning.tune(RunDir(tiny_run), config, lambda c: c.detect.scoring.v,
                                   [{"v": (0.5, 2.0, 3.0, 4.0)}], progress=False, seeds=(0, 1, 2))
    assert [r["v"] for r in rows] == [1.0, 0.5, 2.0, 3.0, 4.0]  # the current setting first
    assert best.detect.scoring.v == 2.0  # the maximum; 3.0 ties and comes later
    # seeds given are used as given, however few the defects (here 3 per seed)
    assert rule["best_on_mean"] == 2 and rule["defects"]["seeds"] == [0, 1, 2]


def test_tune_with_real_validation_defects_takes_the_best_and_says_which_defects_it_used(tiny_run, monkeypatch):
    """Real defects take precedence over synthetic ones (no seeds: the best candidate is taken), and tune.json's
    record names the real images used."""
    from pathlib import Path

    from ddad import load_config, with_detection
    from ddad.data.dataset import Sample
    from ddad.data.splits import TestSplit
    from ddad.engine import tuning
    from ddad.runs import RunDir

    split = TestSplit([Sample(Path("good.png")), Sample(Path("crack.png"), 1, "crack")], torch.zeros(2, 3, 8, 8),
                      torch.zeros(2, 1, 8, 8), np.array([0, 1]), False, "validation")
    monkeypatch.setattr(tuning, "load_validation_split", lambda *args, **kwargs: split)
    values = {0.5: 0.6, 1.0: 0.70, 2.0: 0.705}
    monkeypatch.setattr(tuning, "validation_score", lambda loaded, split: {
        "image_auroc": None, "pixel_auroc": None, "objective": values[loaded]})
    config = with_detection(load_config(tiny_run), v=1.0)
    best, rows, rule = tuning.tune(RunDir(tiny_run), config, lambda c: c.detect.scoring.v, [{"v": (0.5, 2.0)}],
                                   progress=False)
    assert best.detect.scoring.v == 2.0 and rule["spread_over_seeds"] == 0.0
    assert rule["defects"] == {"real": 1, "images": ["crack.png"]}


def test_tune_tries_each_grid_with_the_other_settings_at_the_runs_values():
    from ddad.engine import tuning
    from ddad.methods.ddad.settings import DDADConfig

    current = {"mode": "combined", "v": 1.0, "w": 3.0, "feature_size": 224, "reference": "reconstruction"}
    found = tuning.candidates(tuning.GRIDS["ddad"], current)
    assert found[0] == current and len(found) == len({tuple(sorted(c.items(), key=str)) for c in found})
    pixel = [c for c in found if c["mode"] == "pixel"]
    assert sorted(c["w"] for c in pixel) == [1.0, 3.0, 5.0]  # v and the backbone's size are not tried
    assert all((c["v"], c["feature_size"]) == (1.0, 224) for c in pixel)
    assert all(c["reference"] == "reconstruction" for c in found if c["mode"] != "combined")
    combined = [c for c in found if c["mode"] == "combined" and c["reference"] == "reconstruction"]
    bank = [c for c in found if c["reference"] == "bank"]  # Eq. 8 against a bank: w x v, the backbone's size kept
    assert len(combined) == 3 * 3 * 2 and len(bank) == 3 * 3 and len(found) == 3 + 3 * 2 + 18 + 9
    assert all(c["mode"] == "combined" and c["feature_size"] == 224 for c in bank)
    # None is a value: a run that resizes for the backbone can be tuned back to the image's own size
    resized = tuning.with_candidate(DDADConfig(), current)
    assert tuning.current_values(resized, list(current)) == current
    config = tuning.with_candidate(resized, {**current, "feature_size": None, "v": 2.0})
    assert config.detect.scoring.feature_size is None and config.detect.scoring.v == 2.0


def test_tune_says_which_real_validation_defects_it_used(tmp_path, monkeypatch, capsys):
    """With the user's real validation defects, ``ddad tune`` prints how many it chose on (tune.json's record)."""
    from types import SimpleNamespace

    import ddad.api

    rows = [{"v": 1.0, "image_auroc": 0.7, "pixel_auroc": None, "objective": 0.7}]
    record = {"chosen": {"v": 1.0}, "rule": {"defects": {"real": 4, "images": ["a.png", "b.png", "c.png", "d.png"]},
                                             "best_on_mean": 0}}

    def fake_tune(run_dir, *args, **kwargs):
        (run_dir / "tune.json").write_text(json.dumps(record))
        return None, rows, SimpleNamespace(value=0.5, source="validation")

    monkeypatch.setattr(ddad.api, "tune_run", fake_tune)
    assert main(["tune", str(tmp_path), "--quiet"]) == 0
    assert "validation defects: 4 real (yours)" in capsys.readouterr().out
