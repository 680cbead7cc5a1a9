"""Decisions for a model of several categories: each category's threshold and normalisation from its own
validation images only, each image decided by its category's, and the category recognised from the image when
nobody names it (a PatchCore run over the two synthetic categories)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from ddad import load_config
from ddad.cli import main
from ddad.data import dataset
from ddad.data.formats import build_index
from ddad.data.splits import load_validation_split
from ddad.engine.recognition import CategoryRecogniser
from ddad.engine.thresholds import Decision, Decisions, Threshold, decision_stats_by_category
from ddad.methods import get_method
from ddad.runs import RunDir

from .conftest import forbid_reading


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from ddad.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("decisions") / "data"
    generate(root, SynthConfig(size=32, train=16, test_good=4, test_defective_per_type=2, seed=3))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_root):
    run = tmp_path_factory.mktemp("decisions-run") / "run"
    assert main(["train", "--method", "patchcore", "--data-root", str(synth_root), "--category", "stripes,washer",
                 "--image-size", "32", "--backbone", "mobilenet_v2", "--backbone-weights", "random",
                 "--val-ratio", "0.25", "--set", "bank.fraction=0.25", "--run-dir", str(run), "--quiet"]) == 0
    return run


def _above(values) -> float:
    """The smallest float above every value: the threshold with no false alarm among them."""
    return float(np.nextafter(max(values), np.inf))


def test_each_category_gets_its_own_threshold_from_its_own_validation_images(run, monkeypatch):
    config = load_config(run)
    # the thresholds are chosen before the test split is read: a test image read on the way fails the test
    real_read = forbid_reading(monkeypatch, [s.image for s in build_index(config.data).test],
                               "before the thresholds were chosen")
    from ddad.engine import testing

    real_choose, real_test_split, order = testing.validation_thresholds, testing.load_test_split, []

    def choose(*args, **kwargs):
        chosen = real_choose(*args, **kwargs)
        order.append("thresholds chosen")
        return chosen

    def test_split(*args, **kwargs):
        assert order == ["thresholds chosen"], "the test split was read before the thresholds were chosen"
        monkeypatch.setattr(dataset, "read_image", real_read)
        order.append("test split read")
        return real_test_split(*args, **kwargs)

    monkeypatch.setattr(testing, "validation_thresholds", choose)
    monkeypatch.setattr(testing, "load_test_split", test_split)
    assert main(["test", str(run), "--quiet", "--no-images", "--max-false-alarms", "0"]) == 0
    assert order == ["thresholds chosen", "test split read"]

    # the oracle: every validation image scored on its own, as its category, grouped by hand
    loaded = get_method("patchcore").load(RunDir(run), config, progress=False)
    val = load_validation_split(config.data, progress=False)
    scores = {c: [] for c in ("stripes", "washer")}  # the good images'
    every = {c: [] for c in ("stripes", "washer")}  # with the synthetic defects
    for i, s in enumerate(val.samples):
        score = float(loaded.detect(val.images[i:i + 1], [s.category]).score[0])
        every[s.category].append(score)
        if s.label == 0:
            scores[s.category].append(score)
    stored = json.loads((run / "threshold.json").read_text())
    own = {c: stored["categories"][c]["threshold"] for c in ("stripes", "washer")}
    for c in ("stripes", "washer"):
        assert len(scores[c]) >= 2
        assert own[c] == pytest.approx(_above(scores[c]), rel=1e-5), c
        assert len(every[c]) > len(scores[c])
        assert stored["categories"][c]["validation_range"] == pytest.approx([min(every[c]), max(every[c])], rel=1e-5)
    assert stored["threshold"] == pytest.approx(_above(scores["stripes"] + scores["washer"]), rel=1e-5)
    assert own["stripes"] != pytest.approx(own["washer"], rel=1e-3)  # a real difference to get wrong

    # test: each test image decided by its category's threshold (scores.csv, metrics.json and the report)
    rows = list(csv.DictReader(open(run / "test" / "scores.csv")))
    assert {r["category"] for r in rows} == {"stripes", "washer"}
    for r in rows:
        assert float(r["threshold"]) == own[r["category"]], r["image"]
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert metrics["category_thresholds"] == own
    fp = sum(float(r["score"]) >= own[r["category"]] for r in rows if r["label"] == "0")
    tp = sum(float(r["score"]) >= own[r["category"]] for r in rows if r["label"] == "1")
    good, bad = sum(r["label"] == "0" for r in rows), sum(r["label"] == "1" for r in rows)
    assert metrics["decision"]["fp"] == fp and metrics["decision"]["tp"] == tp
    assert metrics["decision"]["false_alarm_rate"] == pytest.approx(fp / good)
    shared_fp = sum(float(r["score"]) >= stored["threshold"] for r in rows if r["label"] == "0")
    assert metrics["decision_shared_threshold"]["fp"] == shared_fp and bad > 0
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    table = page[page.index("<table class='metrics'>"):]
    table = table[:table.index("</table>")]
    for c in ("stripes", "washer"):  # the category's row of the metrics table ends with its own threshold
        row = table[table.index(f"<tr><th>{c}</th>"):]
        assert row[:row.index("</tr>")].endswith(f"<td>{own[c]:.4g}</td>"), c


def test_predict_decides_each_image_by_the_category_given_found_in_its_path_or_recognised(run, synth_root, tmp_path):
    if not (run / "threshold.json").exists():
        assert main(["test", str(run), "--quiet", "--no-images", "--max-false-alarms", "0"]) == 0
    stored = json.loads((run / "threshold.json").read_text())
    decisions = Decisions.from_stored(stored)
    tested = {r["image"]: r for r in csv.DictReader(open(run / "test" / "scores.csv"))}

    def check(rows, how):
        for r in rows:
            c = r["category"]
            assert r["category_source"] == how, r
            own = decisions.of(c).image
            assert float(r["threshold"]) == own.value
            assert r["pred_label"] == str(int(float(r["score"]) >= own.value))
            assert float(r["pred_score"]) == pytest.approx(float(own.normalise(float(r["score"]))))

    # by the path (the categories' own folders): the same category, score and threshold as ddad test
    out = tmp_path / "path"
    assert main(["predict", str(run), str(synth_root / "stripes" / "test"), str(synth_root / "washer" / "test"),
                 "--out", str(out), "--quiet", "--no-images"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert {r["category"] for r in rows} == {"stripes", "washer"} and len(rows) == len(tested)
    check(rows, "path")
    for r in rows:
        assert r["category"] == tested[r["image"]]["category"]
        assert float(r["score"]) == pytest.approx(float(tested[r["image"]]["score"]), rel=1e-5)

    # recognised: the same images copied into one folder without category names
    flat = tmp_path / "flat"
    flat.mkdir()
    truth = {}
    for i, name in enumerate(sorted(tested)):
        copy = flat / f"part{i:03d}.png"
        shutil.copyfile(name, copy)
        truth[str(copy)] = tested[name]
    out = tmp_path / "recognised"
    assert main(["predict", str(run), str(flat), "--out", str(out), "--quiet", "--no-images"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    check(rows, "recognised")
    right = [r["category"] == truth[r["image"]]["category"] for r in rows]
    assert all(right), f"{right.count(False)} of {len(rows)} images recognised as the wrong category"
    for r in rows:
        assert float(r["score"]) == pytest.approx(float(truth[r["image"]]["score"]), rel=1e-5)
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert metrics["category_recognition"]["accuracy"] == 1.0

    # given: every image as "stripes" (its bank and its threshold), whatever it shows
    out = tmp_path / "given"
    assert main(["predict", str(run), str(flat), "--category", "stripes", "--out", str(out), "--quiet",
                 "--no-images"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    check(rows, "given")
    assert {r["category"] for r in rows} == {"stripes"}
    for r in rows:
        if truth[r["image"]]["category"] == "stripes":
            assert float(r["score"]) == pytest.approx(float(truth[r["image"]]["score"]), rel=1e-5)
        else:  # a washer scored against the stripes bank is farther from it than from its own
            assert float(r["score"]) > float(truth[r["image"]]["score"])
    assert main(["predict", str(run), str(flat), "--category", "gears", "--out", str(out), "--quiet"]) == 2


def test_the_recogniser_names_the_category_of_the_nearest_reference_by_cosine():
    generator = torch.Generator().manual_seed(0)
    references = torch.randn(12, 5, generator=generator)
    labels = [f"c{i % 3}" for i in range(12)]
    queries = torch.randn(40, 5, generator=generator)
    recogniser = CategoryRecogniser(lambda x: x, references * torch.rand(12, 1, generator=generator) * 9, labels,
                                    batch_size=7)
    expected = []
    for q in queries:  # brute force: the largest cosine similarity, references of any length
        cos = [float(q @ r / (q.norm() * r.norm())) for r in references]
        expected.append(labels[int(np.argmax(cos))])
    assert recogniser(queries) == expected
    assert recogniser.categories == ["c0", "c1", "c2"]


def test_decisions_by_category_count_each_image_against_its_own_threshold():
    def decision(value):
        return Decision(Threshold(value, "", {}, 0.0, 1.0))

    decisions = Decisions(decision(0.5), {"a": decision(0.2), "b": decision(0.8)})
    scores = [0.3, 0.3, 0.6, 0.9, 0.1, 0.7]
    labels = [0, 1, 0, 1, 1, 0]
    categories = ["a", "b", "b", "b", "a", None]  # None: the shared threshold
    # decided by hand: a 0.3>=0.2 fp; b 0.3<0.8 fn; b 0.6<0.8 tn; b 0.9 tp; a 0.1<0.2 fn; shared 0.7>=0.5 fp
    stats = decision_stats_by_category(scores, labels, categories, decisions)
    assert (stats["tp"], stats["fp"], stats["fn"], stats["tn"]) == (1, 2, 2, 1)
    assert decisions.of("zz").image.value == 0.5 and decisions.of("b").image.value == 0.8
