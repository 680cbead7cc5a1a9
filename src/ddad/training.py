"""DDPM training of the denoiser (paper Sec. 3, 5.2 and App. 7).

Objective: epsilon prediction, || eps_theta(x_t, t) - eps ||^2 with x_t = sqrt(a_t) x + sqrt(1 - a_t) eps,
t uniform over the schedule, the squared error summed over pixels and averaged over the batch (as the
authors do). Adam, lr 3e-4, weight decay 0.05 (coupled L2, as torch's Adam applies it).

Training is deterministic given the seed: the data order, timesteps and noise of epoch e come from a
generator seeded with (seed, e), so resuming from the checkpoint of epoch e continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .checkpoint import Checkpoint, save_checkpoint
from .diffusion.schedule import alphas_cumprod, q_sample
from .diffusion.unet import UNet
from .runtime import PRECISIONS, autocast, resolve_device

if TYPE_CHECKING:  # imported for annotations only (config.py imports this module)
    from .config import RunConfig
    from .runs import RunDir


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    seed: int = 0
    checkpoint_every: int = 50  # epochs; the last epoch is always saved
    keep_checkpoints: int = 2  # newest N kept; 0 keeps all
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, for CUDA)
    device: str = "auto"
    channels_last: bool = False  # NHWC memory layout for the UNet and its inputs

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def ddpm_loss(
    model: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """Squared error of the noise prediction, summed over pixels, averaged over the batch."""
    xt = q_sample(x0, t, noise, table)
    pred = model(xt, t)
    return (pred.float() - noise).square().sum(dim=(1, 2, 3)).mean()


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.Adam(model.parameters(), **kwargs)


@dataclass
class TrainResult:
    epochs_done: int
    last_loss: float
    checkpoint: str
    images_per_second: float


StepHook = Callable[[int, int, float], None]  # (epoch, global step, loss)


def train(
    run: "RunDir",
    config: "RunConfig",
    images: torch.Tensor,
    resume: bool = False,
    progress: bool = True,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train the UNet of ``config.model`` on ``images`` (N, C, H, W in [-1, 1]) into ``run``.

    With ``resume``, continue from the run's latest checkpoint (weights, optimizer, epoch)."""
    from tqdm.auto import tqdm

    tc = config.train
    device = resolve_device(tc.device)
    if images.ndim != 4 or images.shape[1] != config.model.in_channels:
        raise ValueError(f"images must be (N, {config.model.in_channels}, H, W), got {tuple(images.shape)}")
    if images.shape[-1] != config.model.image_size or images.shape[-2] != config.model.image_size:
        raise ValueError(f"images are {tuple(images.shape[-2:])} but the UNet expects {config.model.image_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)  # initial weights follow the seed, without touching the caller's RNG
        model = UNet(config.model)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(model, tc, device)
    table = alphas_cumprod(config.schedule).to(device=device, dtype=torch.float32)
    start_epoch, step = 0, 0
    if resume:
        path = run.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"--resume: run {run.root} has no checkpoint to resume from")
        ckpt = Checkpoint(path)
        model.load_state_dict(ckpt.state_dict("model"))
        opt_state = ckpt.optimizer_state()
        if opt_state is None:
            raise ValueError(f"checkpoint {path} holds no optimizer state and cannot be resumed")
        optimizer.load_state_dict(opt_state)
        start_epoch, step = int(ckpt.info["epoch"]), int(ckpt.info["step"])
        run.log(f"resumed from {path.name} (epoch {start_epoch}, step {step})")
    else:
        run.log(f"training started: {len(images)} images, device {device}, precision {tc.precision}")

    n = images.shape[0]
    batch = min(tc.batch_size, n)
    steps_per_epoch = -(-n // batch)
    images_cpu = images.contiguous()
    data_on_device = images_cpu.to(device) if device.type == "cuda" else images_cpu
    model.train()
    last_loss = float("nan")
    last_path = run.latest_checkpoint()
    bar = tqdm(total=(tc.epochs - start_epoch) * steps_per_epoch, desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    t_start, seen = time.perf_counter(), 0
    try:
        for epoch in range(start_epoch, tc.epochs):
            gen = torch.Generator().manual_seed(epoch_seed(tc.seed, epoch))
            torch.manual_seed(epoch_seed(tc.seed, epoch) + 1)  # dropout
            perm = torch.randperm(n, generator=gen)
            epoch_loss, t_epoch = 0.0, time.perf_counter()
            for b in range(steps_per_epoch):
                idx = perm[b * batch:(b + 1) * batch]
                x0 = data_on_device[idx.to(data_on_device.device)].contiguous(memory_format=memory_format)
                t = torch.randint(0, config.schedule.num_timesteps, (len(idx),), generator=gen).to(device)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                with autocast(device, tc.precision):
                    loss = ddpm_loss(model, x0, t, noise, table)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                last_loss = loss.item()
                epoch_loss += last_loss
                seen += len(idx)
                rate = seen / max(time.perf_counter() - t_start, 1e-9)
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{tc.epochs}", loss=f"{last_loss:.4g}", img_s=f"{rate:.1f}")
                if on_step is not None:
                    on_step(epoch, step, last_loss)
            done = epoch + 1
            run.log(f"epoch {done} loss {epoch_loss / steps_per_epoch:.6g} "
                    f"({len(images) / (time.perf_counter() - t_epoch):.2f} img/s)")
            if done % tc.checkpoint_every == 0 or done == tc.epochs:
                last_path = run.checkpoint_path(done)
                save_checkpoint(last_path, {"model": model},
                                {"epoch": done, "step": step, "config": config.to_dict()}, optimizer)
                _prune(run, tc.keep_checkpoints)
    except KeyboardInterrupt:
        bar.close()
        where = f"the checkpoint {last_path}" if last_path else "no checkpoint yet"
        run.log(f"interrupted; last saved: {where}")
        raise
    bar.close()
    rate = seen / max(time.perf_counter() - t_start, 1e-9)
    run.log(f"training finished at epoch {tc.epochs} ({rate:.2f} img/s)")
    return TrainResult(tc.epochs, last_loss, str(last_path), rate)


def _prune(run: "RunDir", keep: int) -> None:
    if keep <= 0:
        return
    for _, path in run.checkpoints()[:-keep]:
        path.unlink(missing_ok=True)
