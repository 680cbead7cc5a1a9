"""`--category all` for DDAD, one model per category: trained one after another, tested into one table with
the mean, and run again it continues where it stopped."""

from __future__ import annotations

import json
import shutil

import pytest

from ddad.cli import main


def test_ddad_trains_and_tests_every_category_and_continues_where_it_stopped(synth_root, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data-root", str(synth_root), "--category", "all", "--image-size", "32", "--model", "tiny",
            "--epochs", "1", "--batch-size", "4", "--quiet", "--run-dir", str(run)]
    assert main(args) == 0
    assert json.loads((run / "categories.json").read_text())["categories"] == ["stripes", "washer"]
    stripes_ckpt = next((run / "stripes" / "checkpoints").glob("*.safetensors"))
    stamp, log = stripes_ckpt.stat().st_mtime_ns, (run / "stripes" / "train.log").read_text()
    shutil.rmtree(run / "washer")  # as if the job had stopped before washer
    assert main(args) == 0
    assert stripes_ckpt.stat().st_mtime_ns == stamp  # finished: not trained again, not even reopened
    assert (run / "stripes" / "train.log").read_text() == log
    assert list((run / "washer" / "checkpoints").glob("*.safetensors"))
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0
    table = json.loads((run / "test" / "metrics.json").read_text())
    for category in ("stripes", "washer"):
        own = json.loads((run / "test" / category / "metrics.json").read_text())
        assert table["categories"][category]["image_auroc"] == own["image_auroc"]
        assert table["categories"][category]["pro"] == own["pro"]
    mean = table["category_mean"]
    assert mean["pixel_auroc"] == pytest.approx((table["categories"]["stripes"]["pixel_auroc"]
                                                 + table["categories"]["washer"]["pixel_auroc"]) / 2)
    assert table["pixel_auroc"] == mean["pixel_auroc"]  # the overall figure is the mean, not a pooled one
