"""The training recipe's levers: restricted timesteps, EMA weights, weighting, budgets, mid-epoch resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ddad.engine.trainer as training
from ddad.checkpoint import Checkpoint
from ddad.diffusion.schedule import ScheduleConfig, alphas_cumprod
from ddad.diffusion.unet import UNet
from ddad.runs import RunDir
import ddad.diffusion.objective as objective
from ddad.diffusion.objective import timestep_weights
from ddad.engine.recipe import TrainConfig, ema_update
from ddad.methods.ddad.loading import load_unet
from ddad.runs import WeightsConfig

from .test_training import train

from .test_training import images, tiny_config


def _run(tmp_path, name, **train_kw):
    cfg = tiny_config(epochs=train_kw.pop("epochs", 2), every=1, **train_kw)
    run = RunDir(tmp_path / name)
    run.save_config(cfg)
    return run, cfg


def test_restricted_timesteps_are_never_exceeded(tmp_path, monkeypatch):
    seen = []
    real = objective.ddpm_loss

    from torch._subclasses.fake_tensor import FakeTensor

    def spy(model, x0, t, noise, table, reduction="sum", weights=None):
        if not isinstance(x0, FakeTensor):  # the step's memory is measured once on fake tensors, before training
            seen.append(t.clone())
        return real(model, x0, t, noise, table, reduction, weights)

    monkeypatch.setattr(objective, "ddpm_loss", spy)
    run, cfg = _run(tmp_path, "r", epochs=6, max_timestep=7)
    train(run, cfg, images(12), progress=False)
    t = torch.cat(seen)
    assert len(t) == 6 * 12 and int(t.max()) == 7 and int(t.min()) == 0  # the whole range [0, 7], nothing above

    seen.clear()
    run, cfg = _run(tmp_path, "full", epochs=1, max_timestep=None)
    train(run, cfg, images(12), progress=False)
    assert int(torch.cat(seen).max()) > 250  # the paper's recipe samples the whole schedule


def test_detection_refuses_a_start_step_above_the_trained_range(tmp_path):
    from ddad import DetectConfig
    from ddad.diffusion.sampler import SamplerConfig
    from ddad import load_detector
    from ddad.scoring import ScoringConfig

    run, cfg = _run(tmp_path, "r", epochs=1, max_timestep=100)
    train(run, cfg, images(4), progress=False)
    pixel = ScoringConfig(mode="pixel", sigma=1.0)
    with pytest.raises(ValueError, match=r"T' = 250 is above .*max_timestep = 100"):
        load_detector(run, cfg.replace(detect=DetectConfig(sampler=SamplerConfig(250, 25), scoring=pixel)))
    load_detector(run, cfg.replace(detect=DetectConfig(sampler=SamplerConfig(100, 25), scoring=pixel)))  # fine
    detector, _ = load_detector(run, cfg.replace(detect=DetectConfig(sampler=SamplerConfig(250, 25), scoring=pixel,
                                                                     force_timestep=True)))
    assert detector.reconstruct(images(1)).shape == (1, 1, 16, 16)


def test_ema_weights_differ_from_raw_and_equal_them_with_decay_zero(tmp_path):
    run, cfg = _run(tmp_path, "ema", epochs=3, ema_decay=0.99)
    train(run, cfg, images(8), progress=False)
    ckpt = Checkpoint(run.latest_checkpoint())
    raw, ema = ckpt.state_dict("model"), ckpt.state_dict("ema")
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    # detection takes the EMA weights unless asked for the raw ones
    assert torch.equal(load_unet(run, cfg.model, "cpu", WeightsConfig()).state_dict()["out.2.weight"], ema["out.2.weight"])
    assert torch.equal(load_unet(run, cfg.model, "cpu", WeightsConfig(average="raw")).state_dict()["out.2.weight"],
                       raw["out.2.weight"])

    # decay 0: the average is the current weights, exactly
    a, b = UNet(cfg.model), UNet(cfg.model)
    ema_update(a, b, 0.0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # ... and so is a whole training run with a vanishing decay
    run0, cfg0 = _run(tmp_path, "ema0", epochs=2, ema_decay=1e-12)
    train(run0, cfg0, images(8), progress=False)
    c0 = Checkpoint(run0.latest_checkpoint())
    assert all(torch.equal(c0.state_dict("model")[k], v) for k, v in c0.state_dict("ema").items())


def test_min_snr_weights():
    table = alphas_cumprod(ScheduleConfig()).float()
    t = torch.arange(0, 1000, 37)
    w = timestep_weights(t, table, "min-snr", 5.0)
    snr = table[t] / (1 - table[t])
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w.max() <= 1 and w[0] < 0.01 and w[-1] == 1  # low noise (huge SNR) is down-weighted
    assert timestep_weights(t, table, "uniform") is None  # uniform: no weighting at all


def test_step_budget_stops_mid_epoch_and_resumes_exactly(tmp_path):
    data = images(10)  # batch 4: 3 steps per epoch
    full, cfg = _run(tmp_path, "full", epochs=3, ema_decay=0.9, checkpoint_steps=(4,))
    train(full, cfg, data, progress=False)
    assert any("-step-0000004" in p.name for _, p in full.checkpoints())  # a step mark inside epoch 2

    part, cfg_part = _run(tmp_path, "part", epochs=3, ema_decay=0.9, max_steps=5)
    result = train(part, cfg_part, data, progress=False)
    assert (result.steps_done, result.stopped_by) == (5, "max_steps")
    assert Checkpoint(part.latest_checkpoint()).info["step"] == 5
    cfg_more = cfg_part.replace(train=dataclasses.replace(cfg_part.train, max_steps=None))
    part.save_config(cfg_more)
    result = train(part, cfg_more, data, resume=True, progress=False)
    assert (result.steps_done, result.stopped_by) == (9, "epochs")
    a, b = Checkpoint(full.latest_checkpoint()), Checkpoint(part.latest_checkpoint())
    for k, v in a.tensors.items():
        assert torch.equal(v, b.tensors[k]), k  # weights, EMA and optimizer state identical


def test_time_budget_stops_and_saves(tmp_path, monkeypatch):
    """The clock is patched: every optimizer step takes 20 s, so a 1-minute budget ends after step 3."""
    now = [1000.0]
    monkeypatch.setattr(training, "clock", lambda: now[0])

    def tick(epoch, step, loss):
        now[0] += 20.0

    run, cfg = _run(tmp_path, "t", epochs=1000, max_minutes=1.0)
    result = train(run, cfg, images(8), progress=False, on_step=tick)
    assert result.stopped_by == "max_minutes" and result.steps_done == 3
    info = Checkpoint(run.latest_checkpoint()).info
    assert info["step"] == 3 and info["train_seconds"] == 60.0
    # resuming with the budget spent trains nothing and keeps the checkpoint
    before = run.latest_checkpoint()
    again = train(run, cfg, images(8), resume=True, progress=False, on_step=tick)
    assert again.stopped_by == "max_minutes" and again.steps_done == 3 and run.latest_checkpoint() == before
    # a larger budget continues the time already spent: 1.5 minutes end after 90 s in all, at step 5
    more = cfg.replace(train=dataclasses.replace(cfg.train, max_minutes=1.5))
    run.save_config(more)
    result = train(run, more, images(8), resume=True, progress=False, on_step=tick)
    assert result.steps_done == 5 and Checkpoint(run.latest_checkpoint()).info["train_seconds"] == 100.0


def _recording_optimizer(monkeypatch):
    """Patch the trainer's optimizer factory to record, at every step, the learning rate, the gradient
    norm the optimizer sees (after clipping) and the parameters before and after."""
    log = {"lr": [], "grad_norm": [], "before": [], "after": []}
    real = training.make_optimizer

    def make(model, config, device):
        opt = real(model, config, device)

        def pre(optimizer, args, kwargs):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            log["lr"].append(optimizer.param_groups[0]["lr"])
            log["grad_norm"].append(float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))))
            log["before"].append([p.detach().clone() for p in params])

        def post(optimizer, args, kwargs):
            log["after"].append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)
        return opt

    monkeypatch.setattr(training, "make_optimizer", make)
    return log


def test_warmup_clipping_and_ema_follow_their_formulas(tmp_path, monkeypatch):
    log = _recording_optimizer(monkeypatch)
    run, cfg = _run(tmp_path, "w", epochs=2, lr=2e-3, warmup_steps=4, grad_clip=0.05, ema_decay=0.9)
    train(run, cfg, images(10), progress=False)  # batch 4: 3 steps per epoch, 6 in all
    # linear warm-up over 4 steps, then the full rate
    assert log["lr"] == pytest.approx([2e-3 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)], rel=1e-12)
    # the gradients are large at the start: clipped to exactly the limit
    assert all(n == pytest.approx(0.05, rel=1e-4) for n in log["grad_norm"])
    # EMA by hand: e_0 = the initial weights, e_{s+1} = d_s e_s + (1 - d_s) p_{s+1}, d_s = min(0.9, (1+s)/(10+s))
    ema = [p.clone() for p in log["before"][0]]
    for s, after in enumerate(log["after"]):
        d = min(0.9, (1 + s) / (10 + s))
        ema = [d * e + (1 - d) * p for e, p in zip(ema, after)]
    ckpt = Checkpoint(run.latest_checkpoint())
    names = list(UNet(cfg.model).state_dict())
    stored = ckpt.state_dict("ema")
    params = [n for n in names if n in dict(UNet(cfg.model).named_parameters())]
    assert len(params) == len(ema)
    for name, expected in zip(params, ema):
        assert torch.allclose(stored[name], expected, atol=1e-6, rtol=1e-5), name
    raw = ckpt.state_dict("model")
    assert any(not torch.allclose(raw[n], stored[n]) for n in params)  # the EMA is not the raw weights


def test_learning_rate_warms_up_then_decays_by_epoch():
    from ddad.engine.recipe import learning_rate

    tc = TrainConfig(lr=1e-3, warmup_steps=2, lr_decay_epochs=(3, 5), lr_decay=0.1)
    assert [learning_rate(tc, s, 0) for s in (0, 1, 2)] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert [learning_rate(tc, 100, e) for e in (2, 3, 4, 5, 9)] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    assert learning_rate(TrainConfig(lr=3e-4, warmup_steps=0), 7, 7) == 3e-4  # no decay: exactly lr
