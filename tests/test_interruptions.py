"""Nothing is lost on interruption or a bad file: SIGINT/SIGTERM save and resume exactly, checkpoints by
wall time, a corrupt latest checkpoint falls back to the previous one, files get the user's umask."""

from __future__ import annotations

import os
import signal
import stat

import pytest
import torch

import ddad.engine.trainer as trainer
from ddad.checkpoint import Checkpoint
from ddad.runs import RunDir

from .test_training import images, tiny_config, train


def _run(tmp_path, name, dropout=0.0, **train_kw):
    cfg = tiny_config(epochs=train_kw.pop("epochs", 3), every=3, dropout=dropout, **train_kw)
    run = RunDir(tmp_path / name)
    run.save_config(cfg)
    return run, cfg


def _same_weights(a: RunDir, b: RunDir) -> None:
    ta, tb = Checkpoint(a.latest_checkpoint()).tensors, Checkpoint(b.latest_checkpoint()).tensors
    assert ta.keys() == tb.keys()
    for k, v in ta.items():
        assert torch.equal(v, tb[k]), k


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_and_resume_continues_exactly(tmp_path, signum):
    handler_before = signal.getsignal(signal.SIGINT)  # the default, or ignored when started in the background
    data = images(10)  # batch 4: 3 steps per epoch; checkpoints only at the end (every 3 epochs)
    # dropout: the resumed run must continue the random state of the step it stopped at, not its epoch's start
    full, cfg = _run(tmp_path, "full", ema_decay=0.9, dropout=0.3)
    train(full, cfg, data, progress=False)

    stopped, _ = _run(tmp_path, "stopped", ema_decay=0.9, dropout=0.3)

    def send(epoch, step, loss):
        if step == 5:  # inside the second epoch, long before any regular checkpoint
            os.kill(os.getpid(), signum)

    result = train(stopped, cfg, data, progress=False, on_step=send)
    assert (result.stopped_by, result.steps_done) == ("interrupted", 5)
    saved = Checkpoint(stopped.latest_checkpoint())
    assert saved.info["step"] == 5 and "-step-0000005" in stopped.latest_checkpoint().name
    assert f"{signal.Signals(signum).name} received" in stopped.log_path.read_text()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    result = train(stopped, cfg, data, resume=True, progress=False)
    assert (result.stopped_by, result.steps_done) == ("epochs", 9)
    _same_weights(full, stopped)


def test_ctrl_c_on_the_command_line_saves_and_says_how_to_resume(synth_root, tmp_path, capsys, monkeypatch):
    from ddad.cli import main

    def send(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)

    real_fit = trainer.fit

    def fit_with_ctrl_c(*args, **kwargs):
        return real_fit(*args[:8], **{**kwargs, "on_step": send})

    monkeypatch.setattr("ddad.methods.ddad.method.fit", fit_with_ctrl_c)
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(synth_root), "--category", "washer", "--model", "tiny", "--image-size",
                 "32", "--epochs", "50", "--batch-size", "4", "--run-dir", str(run), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"ddad train --resume --run-dir {run}" in err
    assert Checkpoint(RunDir(run).latest_checkpoint()).info["step"] == 1


def test_checkpoints_by_wall_time_replace_each_other(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(trainer, "clock", lambda: now[0])

    def tick(epoch, step, loss):
        now[0] += 40.0  # a step takes 40 s: a 1.5-minute checkpoint interval passes at steps 3, 6, 9, ...

    run, cfg = _run(tmp_path, "timed", epochs=6, checkpoint_minutes=1.5)  # batch 4 of 12: 3 steps per epoch
    seen = []
    real_save = trainer.save_checkpoint

    def spy(path, *a, **k):
        seen.append(path.name)
        return real_save(path, *a, **k)

    monkeypatch.setattr(trainer, "save_checkpoint", spy)
    cfg = cfg.replace(train=cfg.train.__class__(**{**cfg.train.__dict__, "checkpoint_every": 100, "keep_checkpoints": 1}))
    train(run, cfg, images(12), progress=False, on_step=tick)
    # 40 s steps: due after steps 3 (120 s), 6, ... at the end of each epoch; then the last epoch
    assert seen == [f"epoch-{e:05d}.safetensors" for e in range(1, 7)]
    assert [p.name for _, p in run.checkpoints()] == ["epoch-00006.safetensors"]  # pruned to keep 1
    # inside an epoch: a step-named checkpoint, removed when the next one is written
    run2, cfg2 = _run(tmp_path, "timed2", epochs=1, checkpoint_minutes=1.0)
    now[0] = 0.0
    seen.clear()
    train(run2, cfg2, images(40), progress=False, on_step=tick)  # 10 steps of 40 s: due at steps 2, 4, 6, 8
    assert seen == ["epoch-00000-step-0000002.safetensors", "epoch-00000-step-0000004.safetensors",
                    "epoch-00000-step-0000006.safetensors", "epoch-00000-step-0000008.safetensors",
                    "epoch-00001.safetensors"]
    assert [p.name for _, p in run2.checkpoints()] == ["epoch-00001.safetensors"]


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    run, cfg = _run(tmp_path, "c", epochs=4)
    cfg = cfg.replace(train=cfg.train.__class__(**{**cfg.train.__dict__, "checkpoint_every": 2}))
    train(run, cfg, images(8), progress=False)
    latest = run.checkpoint_path(4)
    good = run.checkpoint_path(2)
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # truncated, as a full disk leaves it
    assert run.latest_checkpoint() == good
    err = capsys.readouterr().err
    assert "epoch-00004.safetensors" in err and "using epoch-00002.safetensors" in err
    # resuming continues from the previous one and rewrites the broken one
    result = train(run, cfg, images(8), resume=True, progress=False)
    assert result.steps_done == 8 and Checkpoint(latest).info["step"] == 8


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run, cfg = _run(tmp_path, "u", epochs=1)
        train(run, cfg, images(4), progress=False)
    finally:
        os.umask(old)
    for path in (run.latest_checkpoint(), run.config_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
