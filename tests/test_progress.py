"""Issue 28, walls 1 and 7: a time budget counts from the start of the command, and every slow phase shows a
named bar with an honest total (the two DRDC trainings, Eq. 17's calibration, export, tune's ETA)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import tqdm.auto
import tqdm.std

from ddad.cli import build_parser, main
from ddad.cli.settings import train_settings
from ddad.data.dataset import Sample
from ddad.results import AnomalyResult


class _Bars:
    """Every tqdm bar made while patched (shown or not): its name, total and the count it was moved by."""

    def __init__(self, monkeypatch):
        self.made = []
        made = self.made

        class Recording(tqdm.auto.tqdm):
            def __init__(self, iterable=None, *a, **k):
                super().__init__(iterable, *a, **k)
                self.record = {"desc": k.get("desc", ""), "n": 0, "shown": not k.get("disable", False),
                               "total": k.get("total", len(iterable) if hasattr(iterable, "__len__") else None)}
                made.append(self)

            def update(self, n=1):
                self.record["n"] += n
                return super().update(n)

        monkeypatch.setattr(tqdm.auto, "tqdm", Recording)

    def named(self, prefix: str) -> list[dict]:
        return [b.record for b in self.made if b.record["desc"].startswith(prefix)]

    def bar(self, prefix: str):
        (found,) = [b for b in self.made if b.record["desc"].startswith(prefix)]
        return found


def test_minutes_count_from_the_start_of_the_command(synth_root, tmp_path, monkeypatch):
    """Loading the images takes 30 s of a 1-minute budget (clock patched), each step 10 s: 3 steps, and the
    checkpoint says 60 s. Before, the budget started at the first step (6 steps, 90 s in all)."""
    import ddad.api as api
    import ddad.engine.trainer as trainer

    now = [0.0]
    monkeypatch.setattr(trainer, "clock", lambda: now[0])
    real_load = api.load_train_images

    def slow_load(*a, **k):
        now[0] += 30.0
        return real_load(*a, **k)

    monkeypatch.setattr(api, "load_train_images", slow_load)
    args = build_parser().parse_args(["train", "--data-root", str(synth_root), "--category", "washer", "--model",
                                      "tiny", "--image-size", "16", "--batch-size", "4", "--val-ratio", "0",
                                      "--backbone-weights", "random", "--minutes", "1", "--epochs", "1000"])
    config = train_settings(args)[0]

    def tick(epoch, step, loss):
        now[0] += 10.0

    result = api.train_run(config, tmp_path / "run", progress=False, on_step=tick)
    from ddad.checkpoint import Checkpoint
    from ddad.runs import RunDir

    assert result.stopped_by == "max_minutes" and result.steps_done == 3
    assert Checkpoint(RunDir(tmp_path / "run").latest_checkpoint()).info["train_seconds"] == 60.0


def test_drdc_names_its_two_trainings_and_its_calibration(synth_root, tmp_path, monkeypatch):
    from .test_drdc_refinement import _train

    bars = _Bars(monkeypatch)
    assert _train(synth_root, tmp_path / "run", "--max-steps", "2") == 0
    base, refiner = bars.named("train base"), bars.named("train refiner")
    assert len(base) == 1 and len(refiner) == 1 and base[0]["total"] == 2 == refiner[0]["total"]
    assert {b["desc"] for b in bars.named("train")} == {"train base", "train refiner"}
    bars.made.clear()
    assert main(["test", str(tmp_path / "run"), "--no-images"]) == 0
    (calibrate,) = bars.named("calibrate")
    assert calibrate["shown"]
    # detect.calibration_images (16), capped at the 14 training images, every one counted
    assert calibrate["total"] == 14 and calibrate["n"] == 14
    names = [b.record["desc"] for b in bars.made]
    assert names.index(calibrate["desc"]) < names.index("detect")  # before the first detection bar


def test_export_shows_each_graph(tmp_path, synth_root, monkeypatch):
    pytest.importorskip("onnx")
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(synth_root), "--category", "washer", "--model", "tiny", "--image-size",
                 "16", "--max-steps", "1", "--batch-size", "4", "--val-ratio", "0", "--backbone", "mobilenet_v2",
                 "--backbone-weights", "random", "--quiet", "--run-dir", str(run)]) == 0
    bars = _Bars(monkeypatch)
    written = []  # placeholders, not graphs (test_export_runtime checks those): the bar's counts are the point

    def placeholder(module, args, path, *names):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"graph")
        written.append(path.name)

    # the module ddad.export (the name ddad.export is also the API's function)
    monkeypatch.setattr(importlib.import_module("ddad.export"), "export_graph", placeholder)
    assert main(["export", str(run), "--quiet"]) == 0
    (bar,) = bars.named("export")
    assert bar["total"] == 3 and bar["n"] == 3 and written == ["unet.onnx", "scorer.onnx", "extractor.onnx"]


def test_tunes_eta_follows_the_mean_time_per_setting(monkeypatch):
    """The first setting takes 100 s (its maps are computed), the next ones 1 s (they re-weigh the same maps).
    During the fourth of 5 (103 s in), the remaining time shown is 2 x 103 / 3 s, the mean rate's, not a few
    seconds (the recent settings' rate)."""
    from ddad.engine import tuning

    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    bars = _Bars(monkeypatch)
    labels = np.array([0, 0, 1, 1])

    class Loaded:
        crop = 1.0

        def score_split(self, split, cache, progress):
            now[0] += 100.0 if not calls else 1.0
            calls.append(1)
            return AnomalyResult(score=torch.tensor([0.1, 0.2, 0.8, 0.9]), anomaly_map=torch.zeros(4, 1, 4, 4))

    class Split:
        has_masks = False

    Split.labels = labels
    Split.samples = [Sample(Path(f"{i}.png"), int(label)) for i, label in enumerate(labels)]
    calls: list = []
    etas = []
    real_score = tuning.validation_score

    def score(loaded, split):
        out = real_score(loaded, split)
        if len(calls) == 4:  # the fourth setting starts after three were done
            d = bars.bar("tune").format_dict
            etas.append((d["total"] - d["n"]) / (d["rate"] or d["n"] / d["elapsed"]))
        return out

    monkeypatch.setattr(tuning, "validation_score", score)

    class Config:
        method = "test"

    monkeypatch.setattr(tuning, "current_values", lambda config, names: {"alpha": 0.9})
    monkeypatch.setattr(tuning, "with_candidate", lambda config, candidate: config)
    tuning.search(Config(), lambda c: Loaded(), [{"alpha": [0.0, 0.1, 0.5, 1.0]}], Split(), progress=True)
    assert len(calls) == 5 and len(etas) == 1
    assert etas[0] == pytest.approx(2 * 103.0 / 3, rel=0.01)
