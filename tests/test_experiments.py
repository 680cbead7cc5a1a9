"""Issue 28, wall 4: a test with other settings than the run's (the README's Python example) writes
elsewhere and keeps the run's own results and threshold, so the README's next command still works."""

from __future__ import annotations

import csv
import json

from ddad import api, load_config, with_detection
from ddad.cli import main


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_an_experiment_with_other_settings_keeps_the_runs_own_results(synth_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(synth_root), "--category", "washer", "--model", "tiny", "--image-size",
                 "32", "--max-steps", "2", "--batch-size", "4", "--val-ratio", "0.25", "--backbone-weights",
                 "random", "--quiet", "--run-dir", str(run)]) == 0
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0
    own_metrics = (run / "test" / "metrics.json").read_bytes()
    own = json.loads((run / "threshold.json").read_text())

    # the README's example: other detection settings through the API
    metrics = api.test_run(run, with_detection(load_config(run), w=5), save_images=False, progress=False)
    assert (run / "test" / "metrics.json").read_bytes() == own_metrics  # the run's outputs untouched
    (experiment,) = (run / "experiments").iterdir()
    written = json.loads((experiment / "metrics.json").read_text())
    assert written["threshold"] == metrics.threshold and written["settings"] != json.loads(own_metrics)["settings"]
    stored = json.loads((run / "threshold.json").read_text())
    assert stored["calibration_key"] != own["calibration_key"]
    assert stored["others"][own["calibration_key"]]["threshold"] == own["threshold"]

    # the next commands work with either settings, each with its own threshold
    folder = synth_root / "washer" / "test"
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "p1"), "--no-images", "--quiet"]) == 0
    assert {float(r["threshold"]) for r in _rows(tmp_path / "p1" / "scores.csv")} == {own["threshold"]}
    one = next(folder.rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", str(run), str(one), "--out", str(tmp_path / "p3"), "--no-images", "--quiet"]) == 0
    assert "scored 1 image;" in capsys.readouterr().out
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "p2"), "--no-images", "--quiet",
                 "--w", "5"]) == 0
    assert {float(r["threshold"]) for r in _rows(tmp_path / "p2" / "scores.csv")} == {metrics.threshold}

    # the command line does the same, and says where it wrote; the run's own settings still write test/
    capsys.readouterr()
    assert main(["test", str(run), "--quiet", "--no-images", "--w", "5"]) == 0
    assert f"metrics: {experiment / 'metrics.json'}" in capsys.readouterr().out
    assert main(["test", str(run), "--quiet", "--no-images", "--device", "cpu"]) == 0  # runtime: the run's own
    assert f"metrics: {run / 'test' / 'metrics.json'}" in capsys.readouterr().out
    assert json.loads((run / "threshold.json").read_text())["calibration_key"] == own["calibration_key"]
