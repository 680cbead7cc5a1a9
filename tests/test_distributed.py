"""Data-parallel training with torch.distributed (gloo, 2 processes on this CPU): the same weights as one
process with the same global batch, resumable with another world size, and only rank 0 writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddad.checkpoint import Checkpoint
from ddad.runs import RunDir


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], world: int, cwds: list[Path]) -> list[str]:
    """``ddad args`` in ``world`` processes (rank r in cwds[r]), as torchrun would start them; their outputs."""
    port = _port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        cwds[rank].mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "ddad", *args], cwd=cwds[rank], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


def _train(args: list[str], world: int, cwds: list[Path]) -> None:
    _launch(["train", *args], world, cwds)


def _ddad_args(root: Path, *extra: str) -> list[str]:
    return ["--data-root", str(root), "--category", "washer", "--image-size", "32", "--model", "tiny",
            "--batch-size", "4", "--val-ratio", "0", "--quiet", *extra]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return Checkpoint(RunDir(run).latest_checkpoint()).tensors


def _same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], hidden: int = 0) -> None:
    """The weights and moving averages of two trainings agree. With ``hidden``, the key projection's bias of
    each attention (in_proj_bias[hidden:2 * hidden]) is left out: softmax ignores it, so its gradient is zero
    up to rounding, which Adam normalises into steps of +-lr that differ with the order of the sums."""
    assert a.keys() == b.keys()
    compared = 0
    for k in a:
        if not k.startswith(("model.", "ema.")):
            continue
        x, y = a[k], b[k]
        if hidden and k.endswith("attn.in_proj_bias"):
            x, y = torch.cat([x[:hidden], x[2 * hidden:]]), torch.cat([y[:hidden], y[2 * hidden:]])
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), k
        compared += 1
    assert compared > 0


def _at_step(run: Path, step: int) -> Checkpoint:
    return Checkpoint(next(p for _, p in RunDir(run).checkpoints() if f"-step-{step:07d}" in p.name))


def test_two_processes_train_as_one_only_rank_0_writes_and_one_process_resumes_their_run(synth_root, tmp_path):
    """7 training images (one held out), global batch 4: every second batch has 3 images, split 2 + 1. One
    process trains 4 steps (keeping step 2); two processes train the first 2 steps to the same weights, rank 1
    writing nothing; one process resumes their run to step 4, again to the single process's weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*_ddad_args(synth_root, "--run-dir", "run"), "--val-ratio", "0.125"]
    _train([*args, "--max-steps", "4", "--set", "train.checkpoint_steps=[2]"], 1, [one])
    out0, out1 = _launch(["train", *args, "--max-steps", "2"], 2, [two / "rank0", two / "rank1"])
    assert not any((two / "rank1").iterdir())  # the other rank wrote nothing
    assert "trained" in out0 and "7 train images" in out0  # rank 0 prints the banner and the summary, alone
    assert "trained" not in out1 and "train images" not in out1
    assert "world size 2, backend gloo" in (two / "rank0" / "run" / "train.log").read_text()
    _same_training(_at_step(one / "run", 2).tensors, _weights(two / "rank0" / "run"))
    _train(["--resume", "--run-dir", "run", "--max-steps", "4", "--quiet"], 1, [two / "rank0"])
    assert Checkpoint(RunDir(two / "rank0" / "run").latest_checkpoint()).info["step"] == 4
    _same_training(_weights(one / "run"), _weights(two / "rank0" / "run"))
    resumed = [line for line in (two / "rank0" / "run" / "train.log").read_text().splitlines() if "resumed" in line]
    assert "world size 1" in resumed[-1]


def test_a_global_batch_the_world_size_does_not_divide_is_an_error(synth_root, tmp_path):
    port = _port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "ddad", "train",
                               *_ddad_args(synth_root, "--max-steps", "1", "--batch-size", "3", "--run-dir",
                                           str(tmp_path / "run"))],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert any("not divisible by the world size 2" in o for o in outs), outs


def _drdc_args(root: Path, category: str, batch: int, steps: int, *extra: str) -> list[str]:
    """A tiny DRDC run (random backbone, dropout off so that the ranks' dropout draws cannot differ)."""
    return ["--method", "drdc", "--data-root", str(root), "--category", category, "--image-size", "32",
            "--batch-size", str(batch), "--backbone", "mobilenet_v2", "--backbone-weights", "random", "--val-ratio",
            "0", "--set", "features.grid=4", "--set", "model.hidden=32", "--set", "model.heads=4",
            "--set", "model.encoder_layers=1", "--set", "model.decoder_layers=1", "--set", "model.ffn=64",
            "--set", "model.neighbour=3", "--set", "model.dropout=0.0", "--max-steps", str(steps), "--quiet",
            "--run-dir", "run", *extra]


def test_distributed_evaluation_scores_an_odd_number_of_images_once_each(synth_root, tmp_path):
    import csv
    import json

    from ddad.cli import main

    run = tmp_path / "run"  # trained in this process (one start of Python fewer); tested in 1 and 2
    assert main(["train", *_ddad_args(synth_root, "--epochs", "1", "--run-dir", str(run), "--val-ratio", "0.25",
                                      "--set", "detect.scoring.mode=pixel")]) == 0
    _launch(["test", str(run), "--quiet", "--no-images", "--out", str(tmp_path / "one")], 1, [tmp_path])
    outs = _launch(["test", str(run), "--quiet", "--no-images", "--out", str(tmp_path / "two")], 2,
                   [tmp_path, tmp_path])
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["n_images"] == two["n_images"] == 9  # 3 good + 6 defective: odd, no padding, no repeats
    for key in ("image_auroc", "pixel_auroc", "pro", "threshold"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    rows_one = list(csv.DictReader(open(tmp_path / "one" / "scores.csv")))
    rows_two = list(csv.DictReader(open(tmp_path / "two" / "scores.csv")))
    assert [r["image"] for r in rows_one] == [r["image"] for r in rows_two]
    assert [float(r["score"]) for r in rows_two] == pytest.approx([float(r["score"]) for r in rows_one], abs=1e-6)
    assert sum("image AUROC" in o for o in outs) == 1  # rank 0 reports, rank 1 is quiet


def test_drdc_trains_both_its_models_the_same_on_two_processes_with_an_uneven_last_batch(synth_root, tmp_path):
    """7 training images (one of washer's 8 held out), global batch 4 for the base model and the refiner:
    the second batch of each epoch splits 2 + 1, so each rank's loss must be weighted by its share."""
    args = _drdc_args(synth_root, "washer", 4, 3, "--val-ratio", "0.125", "--set", "refine.image_size=32",
                      "--set", "refine.unet=tiny", "--set", "refine.cells=[4,8]", "--set", "refine_train.batch_size=4")
    one, two = tmp_path / "one", tmp_path / "two"
    _train(args, 1, [one])
    _train(args, 2, [two / "rank0", two / "rank1"])
    assert Checkpoint(RunDir(one / "run").latest_checkpoint()).info["step"] == 3
    _same_training(_weights(one / "run"), _weights(two / "rank0" / "run"), hidden=32)
    refined = [Checkpoint(RunDir(r, "refine").latest_checkpoint()) for r in (one / "run", two / "rank0" / "run")]
    assert refined[0].info["step"] == refined[1].info["step"] == 3
    _same_training(refined[0].tensors, refined[1].tensors)
    assert not any((two / "rank1").iterdir())
