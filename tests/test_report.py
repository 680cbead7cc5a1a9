from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ddad.cli import main
from ddad.report import roc_points

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_roc_points_trace_the_curve():
    fpr, tpr = roc_points(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 1, 0, 0]))
    assert list(fpr) == [0.0, 0.0, 0.5, 1.0] and list(tpr) == [0.0, 0.5, 1.0, 1.0]


@pytest.fixture(scope="module")
def report(tmp_path_factory, synth_root):
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["train", "--data-root", str(synth_root), "--category", "washer", "--model", "tiny",
                 "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--run-dir", str(run), "--quiet",
                 "--set", "detect.scoring.mode=pixel", "--set", "detect.sampler.start_step=50",
                 "--set", "detect.crop=1.0"]) == 0
    assert main(["test", str(run), "--quiet", "--report"]) == 0
    return run / "report" / "index.html"


def test_report_is_self_contained(report):
    page = report.read_text()
    assert "<table class='metrics'>" in page and "image AUROC" in page
    assert page.count("<svg") == 3  # ROC, PRO, histogram
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert len(srcs) == 9 and all((report.parent / s).is_file() for s in srcs)
    assert "http://" not in page and "https://" not in page  # nothing from a network
    # worst errors first: every missed defect is listed before any correct image
    kinds = re.findall(r"<div class='item (\w+)'>", page)
    assert kinds == sorted(kinds, key=lambda k: {"fn": 0, "fp": 1, "ok": 2}[k])


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run(base + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert "image AUROC" in dom.stdout and dom.stdout.count("<img") == 9
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,900", report.as_uri()],
                   capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (900, 1200) and img.std() > 10  # a rendered page, not a blank one


def test_report_orders_missed_defects_then_false_alarms_then_correct(tmp_path):
    """Known outcomes at threshold 0.5: missed defects first (furthest below the threshold first), then
    false alarms (furthest above first), then correct images (closest to the threshold first)."""
    import csv
    import json

    from ddad.report import write_report
    from ddad.runs import RunDir

    test_dir = tmp_path / "test"
    test_dir.mkdir()
    rows = [  # name, label, score
        ("ok_far_good", 0, 0.05), ("fn_slight", 1, 0.45), ("fp_slight", 0, 0.55), ("ok_near_bad", 1, 0.53),
        ("fn_bad", 1, 0.10), ("fp_bad", 0, 0.95), ("ok_near_good", 0, 0.48), ("ok_far_bad", 1, 0.99),
    ]
    with open(test_dir / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "defect_type", "label", "score"])
        for name, label, score in rows:
            writer.writerow([f"/data/{name}.png", "crack" if label else "good", label, score])
    (test_dir / "metrics.json").write_text(json.dumps({
        "dataset": "fake", "image_auroc": 0.5, "pixel_auroc": None, "pro": None, "n_images": 8, "n_defective": 4,
        "threshold": 0.5}))
    page = write_report(RunDir(tmp_path), test_dir, tmp_path / "report").read_text()
    order = re.findall(r"</b> (\w+)\.png", page)
    assert order == ["fn_bad", "fn_slight", "fp_bad", "fp_slight", "ok_near_good", "ok_near_bad", "ok_far_good",
                     "ok_far_bad"]
    kinds = re.findall(r"<div class='item (\w+)'>", page)
    assert kinds == ["fn", "fn", "fp", "fp", "ok", "ok", "ok", "ok"]
    assert "2 missed defects, 2 false alarms" in page
