"""Issue 28, wall 4: a test with other settings than the run's (the README's Python example) writes
elsewhere and keeps the run's own results and threshold, so the README's next command still works. Walls
10 and 11: predict's panels keep the images' relative paths, and odd inputs are said, not passed silently."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
from PIL import Image

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


def test_predict_names_panels_by_relative_path_and_says_what_it_did_not_score(synth_root, tmp_path, capsys,
                                                                              monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(synth_root), "--category", "washer", "--model", "tiny", "--image-size",
                 "32", "--max-steps", "1", "--batch-size", "4", "--val-ratio", "0", "--backbone-weights", "random",
                 "--quiet", "--run-dir", str(run)]) == 0
    images = sorted((synth_root / "washer" / "test" / "good").glob("*.png"))
    src = tmp_path / "in"
    for sub in ("a", "b"):  # the same file name in two sub-folders
        (src / sub).mkdir(parents=True)
        shutil.copy(images[0], src / sub / "000.png")
    (src / "readme.txt").write_text("not an image")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(src / "dot.png")
    from ddad.engine import predicting

    titles = {}
    real_panel = predicting.panel

    def recording(image, recon, amap, mask, title, *args, **kwargs):
        titles[title.split()[0]] = title
        return real_panel(image, recon, amap, mask, title, *args, **kwargs)

    monkeypatch.setattr(predicting, "panel", recording)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["predict", str(run), str(src), "--out", str(out), "--threshold", "0.5", "--quiet"]) == 0
    captured = capsys.readouterr()
    rows = {r["image"]: r for r in _rows(out / "scores.csv")}
    a, b, dot = (rows[str(src / n)] for n in ("a/000.png", "b/000.png", "dot.png"))
    assert (a["panel"], b["panel"]) == ("images/a/000.png", "images/b/000.png")
    assert (out / a["panel"]).is_file() and (out / b["panel"]).is_file()
    assert set(titles) == {"a/000.png", "b/000.png"}  # each panel titled with its relative path
    # the 1 x 1 image is refused with the reason, the text file named in a note
    assert dot["score"] == "" and "1x1 pixels is too small" in dot["error"] and dot["panel"] == ""
    assert "not images" in captured.err and "readme.txt" in captured.err
    assert str(src / "readme.txt") not in rows
    # an empty pred_score says why
    assert a["pred_score"] == "" and "--threshold" in a["note"] and a["decision"] in ("good", "defective")
