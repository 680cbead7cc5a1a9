from __future__ import annotations

import pytest
import torch

from ddad.checkpoint import Checkpoint, save_checkpoint
from ddad import RunConfig
from ddad.data.formats import DataConfig
from ddad.diffusion.schedule import ScheduleConfig, alphas_cumprod
from ddad.diffusion.unet import UNet, UNetConfig
from ddad.runs import RunDir
from ddad.diffusion.objective import ddpm_loss
from ddad.engine.recipe import TrainConfig, make_optimizer
from ddad.methods.ddad import DDAD

train = DDAD().fit  # the engine's loop with DDAD's UNet and DDPM objective


def tiny_config(epochs=4, every=2, dropout=0.0, **train):
    model = UNetConfig(image_size=16, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,), num_heads=2, dropout=dropout)
    return RunConfig(data=DataConfig(root="unused", category="x", image_size=16, channels=1), model=model,
                     train=TrainConfig(epochs=epochs, batch_size=4, checkpoint_every=every, keep_checkpoints=0,
                                       seed=3, **train))


def images(n=10):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = UNet(cfg.model)
    opt = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.0), torch.device("cpu"))
    table = alphas_cumprod(ScheduleConfig())
    x = images(8)
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    first = ddpm_loss(model, x, t, noise, table).item()
    for _ in range(30):
        loss = ddpm_loss(model, x, t, noise, table)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_paper_recipe_is_the_papers_hyperparameters():
    tc = TrainConfig.recipe("paper")
    assert (tc.lr, tc.weight_decay, tc.batch_size) == (3e-4, 0.05, 32)
    assert tc.loss_reduction == "sum" and tc.max_timestep is None and tc.timestep_weighting == "uniform"
    assert (tc.warmup_steps, tc.grad_clip, tc.ema_decay) == (0, None, 0.0)
    s = ScheduleConfig()
    assert (s.num_timesteps, s.beta_start, s.beta_end) == (1000, 1e-4, 0.02)
    opt = make_optimizer(torch.nn.Linear(1, 1), tc, torch.device("cpu"))
    # coupled L2: torch's Adam (not AdamW) with weight decay 0.05
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == 0.05
    # loss summed over pixels: 16 x 16 pixels give 256 times the per-pixel mean
    model = UNet(tiny_config().model)
    x, t = images(2), torch.tensor([10, 900])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    table = alphas_cumprod(s)
    total = ddpm_loss(model, x, t, noise, table, tc.loss_reduction)
    assert torch.allclose(total, 256 * ddpm_loss(model, x, t, noise, table, "mean"))
    # the default recipe differs where the measurements said so
    d = TrainConfig()
    assert type(make_optimizer(torch.nn.Linear(1, 1), d, torch.device("cpu"))) is torch.optim.AdamW
    assert d.max_timestep == 250 and d.ema_decay > 0 and d.loss_reduction == "mean"
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig.recipe("fast")


@pytest.mark.parametrize("dropout,mark", [(0.3, ()), (0.3, (7,))])
def test_kill_and_resume_equals_uninterrupted(tmp_path, dropout, mark):
    """Killed at step 8 (in the third epoch of 3 steps), resumed from the epoch-2 checkpoint, or with a
    checkpoint mark at step 7 from the middle of the epoch, where dropout's random state must be restored."""
    cfg = tiny_config(epochs=4, every=2, dropout=dropout, checkpoint_steps=mark)
    data = images()
    full = RunDir(tmp_path / "full")
    full.save_config(cfg)
    train(full, cfg, data, progress=False)

    killed = RunDir(tmp_path / "killed")
    killed.save_config(cfg)

    def kill(epoch, step, loss):
        if epoch == 2 and step == 8:  # in the middle of the third epoch, after the epoch-2 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(killed, cfg, data, progress=False, on_step=kill)
    assert Checkpoint(killed.latest_checkpoint()).info["step"] == (mark[0] if mark else 6)
    train(killed, cfg, data, resume=True, progress=False)

    a, b = Checkpoint(full.latest_checkpoint()), Checkpoint(killed.latest_checkpoint())
    assert a.info["epoch"] == b.info["epoch"] == 4 and a.info["step"] == b.info["step"]
    for k, v in a.tensors.items():
        assert torch.equal(v, b.tensors[k]), k  # weights and optimizer state identical
    assert any(k.startswith("optimizer.state.") for k in a.tensors)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    cfg = tiny_config(epochs=3, every=1).replace(train=TrainConfig(epochs=3, batch_size=4, checkpoint_every=1,
                                                                    keep_checkpoints=2))
    run = RunDir(tmp_path / "run")
    run.save_config(cfg)
    train(run, cfg, images(4), progress=False)
    assert [e for e, _ in run.checkpoints()] == [2, 3]
    assert not list(run.checkpoint_dir.glob("*.tmp"))
    assert "epoch 3 step 3 loss" in run.log_path.read_text()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The write itself fails partway (a partial file on disk, then an error): the previous checkpoint
    must still load and no partial file may be left behind."""
    import ddad.checkpoint as checkpoint_module

    path = tmp_path / "c.safetensors"
    model = torch.nn.Linear(2, 2)
    save_checkpoint(path, {"model": model}, {"epoch": 1})
    expected = model.weight.detach().clone()

    def torn_write(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:  # half a header, as a full disk or a kill would leave it
            fh.write(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"model.weight\": {")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", torn_write)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"model": model}, {"epoch": 2})
    ckpt = Checkpoint(path)
    assert ckpt.info["epoch"] == 1 and torch.equal(ckpt.state_dict("model")["weight"], expected)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "epoch-00001.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="epoch-00001.safetensors"):
        Checkpoint(bad)
