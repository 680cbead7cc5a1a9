"""A run directory written by ddad 0.1.0 (tests/data/run-v0.1.0: its config.yaml, log and checkpoint, trained
on the synthetic data below) still loads, and ``ddad test`` gives the scores that version gave."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from ddad.cli import main
from ddad.data.synth import SynthConfig, generate

STORED = Path(__file__).parent / "data" / "run-v0.1.0"
EXPECTED = Path(__file__).parent / "data" / "run-v0.1.0-expected"


def test_a_stored_run_still_loads_and_scores_as_before(tmp_path, monkeypatch):
    generate(tmp_path / "data", SynthConfig(size=16, train=8, test_good=3, test_defective_per_type=1,
                                            categories=("washer",)))
    shutil.copytree(STORED, tmp_path / "run")
    # The stored config names its data root relative to where it trained (tmp_path here). 0.2 finds it from
    # any working directory: here from inside the run directory, where "data" is not.
    monkeypatch.chdir(tmp_path / "run")
    assert main(["test", ".", "--no-images", "--quiet"]) == 0
    got = list(csv.DictReader(open(tmp_path / "run" / "test" / "scores.csv")))
    want = list(csv.DictReader(open(EXPECTED / "scores.csv")))
    assert [Path(r["image"]) for r in got] == [tmp_path / r["image"] for r in want]
    for g, w in zip(got, want):  # bit-identical at one thread count; other counts round differently
        assert float(g["score"]) == pytest.approx(float(w["score"]), rel=1e-5), g["image"]
    metrics = json.loads((tmp_path / "run" / "test" / "metrics.json").read_text())
    expected = json.loads((EXPECTED / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-4), key
