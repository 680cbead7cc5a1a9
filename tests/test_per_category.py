"""`--category all` for DDAD, one model per category: trained one after another, tested into one table with
the mean, and run again it continues where it stopped."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import ddad.engine.trainer as trainer
from ddad.checkpoint import Checkpoint
from ddad.cli import main
from ddad.runs import RunDir


def test_ddad_trains_and_tests_every_category_and_continues_where_it_stopped(synth_root, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the first category stops the job there (the second is not started); run
    again, it continues the interrupted category from its checkpoint to the same weights as an uninterrupted
    run, then trains the second; a third time, it skips both without opening them."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    common = ["--data-root", str(synth_root), "--image-size", "32", "--model", "tiny", "--epochs", "2",
              "--batch-size", "4", "--quiet"]
    args = ["train", *common, "--category", "all", "--run-dir", str(run)]
    real_fit = trainer.fit

    def ctrl_c_in_stripes(run_dir, *rest, **kwargs):
        def send(epoch, step, loss):
            if step == 3:  # mid-epoch: the second epoch's first step
                os.kill(os.getpid(), signal.SIGINT)

        return real_fit(*(run_dir, *rest[:7]), **{**kwargs, "on_step": send if run_dir.root.name == "stripes" else None})

    monkeypatch.setattr("ddad.methods.ddad.method.fit", ctrl_c_in_stripes)
    assert main(args) == 130
    assert Checkpoint(RunDir(run / "stripes").latest_checkpoint()).info["step"] == 3
    assert not (run / "washer").exists()  # the job stopped where it was interrupted
    monkeypatch.setattr("ddad.methods.ddad.method.fit", real_fit)
    assert json.loads((run / "categories.json").read_text())["categories"] == ["stripes", "washer"]
    assert main(args) == 0
    assert "resumed from epoch-00001-step-0000003" in (run / "stripes" / "train.log").read_text()
    assert main(["train", *common, "--category", "stripes", "--run-dir", str(reference)]) == 0
    a = Checkpoint(RunDir(run / "stripes").latest_checkpoint())
    b = Checkpoint(RunDir(reference).latest_checkpoint())
    assert a.info["step"] == b.info["step"] == 4
    for k, v in b.tensors.items():
        assert torch.equal(v, a.tensors[k]), k
    finished = {c: (next((run / c / "checkpoints").glob("epoch-00002*")), (run / c / "train.log").read_text())
                for c in ("stripes", "washer")}
    stamps = {c: path.stat().st_mtime_ns for c, (path, _) in finished.items()}
    assert main(args) == 0
    for c, (path, log) in finished.items():  # finished: not trained again, not even reopened
        assert path.stat().st_mtime_ns == stamps[c] and (run / c / "train.log").read_text() == log, c
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
