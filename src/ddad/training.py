"""DDPM training of the denoiser (paper Sec. 3, 5.2 and App. 7).

Objective (Eq. 1-2): epsilon prediction, || eps_theta(x_t, t) - eps ||^2 with
x_t = sqrt(a_t) x + sqrt(1 - a_t) eps, averaged over the batch.

Two recipes (:data:`RECIPES`). ``paper``: t uniform over all 1000 steps, the error summed over pixels,
Adam lr 3e-4 with weight decay 0.05 as L2 in the gradient, batch 32. ``default`` (ddad's): t uniform
in [0, T'max] (the sampler never visits a larger t), the error averaged over pixels, AdamW lr 1e-3 with a
100-step warm-up and gradient clipping, batch 16, and an exponential moving average of the weights, which
detection uses. At equal CPU budgets it gives better reconstructions (pixel-wise scores) than the paper's
recipe on MTD and KolektorSDD; BENCHMARKS.md ("Sample-efficient training") has the figures, including
where it is not better (MTD with combined scoring).

Training is deterministic given the seed: the data order, timesteps and noise of epoch e come from a
generator seeded with (seed, e), so resuming from the checkpoint of epoch e continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import copy
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


OPTIMIZERS = ("adam", "adamw")
LOSS_REDUCTIONS = ("sum", "mean")
TIMESTEP_WEIGHTINGS = ("uniform", "min-snr")


@dataclass(frozen=True)
class TrainConfig:
    """How the denoiser is trained. The defaults are ddad's recipe; ``TrainConfig.recipe("paper")`` is the
    paper's (Sec. 5.2, App. 7). See :data:`RECIPES` for what differs and docs in BENCHMARKS.md for why."""

    epochs: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adam: L2 added to the gradient (the paper, torch's Adam) | adamw: decoupled
    loss_reduction: str = "mean"  # squared error over pixels: mean | sum (the paper)
    # Train t uniform in [0, max_timestep] (None: the whole schedule). Detection then refuses a T' above it.
    max_timestep: int | None = 250
    timestep_weighting: str = "uniform"  # uniform | min-snr (Hang et al. 2023, weight min(SNR, gamma) / SNR)
    min_snr_gamma: float = 5.0
    warmup_steps: int = 100  # linear learning-rate warm-up from 0
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    ema_decay: float = 0.999  # EMA of the weights used for detection (0: none); warm-up (1+n)/(10+n)
    seed: int = 0
    checkpoint_every: int = 50  # epochs; the last epoch is always saved
    keep_checkpoints: int = 2  # newest N kept; 0 keeps all
    checkpoint_steps: tuple[int, ...] = ()  # extra checkpoints after these optimizer steps (kept)
    max_steps: int | None = None  # stop (and save) after this many optimizer steps in all
    max_minutes: float | None = None  # stop (and save) after this much training time in all (resumes add up)
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
        for name, allowed in (("optimizer", OPTIMIZERS), ("loss_reduction", LOSS_REDUCTIONS),
                              ("timestep_weighting", TIMESTEP_WEIGHTINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_timestep is not None and self.max_timestep < 0:
            raise ValueError(f"max_timestep must be >= 0 (or null for the whole schedule), got {self.max_timestep}")
        if self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 (or null), got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if any(s < 1 for s in self.checkpoint_steps):
            raise ValueError(f"checkpoint_steps must be >= 1, got {self.checkpoint_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")

    @classmethod
    def recipe(cls, name: str, **overrides) -> "TrainConfig":
        """The settings of recipe ``name`` (see :data:`RECIPES`), with ``overrides``."""
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
        return cls(**{**RECIPES[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint_steps"] = list(self.checkpoint_steps)
        return d


# What each recipe sets; everything else keeps the TrainConfig defaults.
RECIPES: dict[str, dict] = {
    # ddad's default; measured against the paper's in BENCHMARKS.md ("Sample-efficient training").
    "default": {},
    # The paper (Sec. 5.2, App. 7, and the authors' code): Adam lr 3e-4 with weight decay 0.05 applied as
    # L2 in the gradient, squared error summed over pixels, t uniform over all 1000 steps, batch 32, no
    # warm-up, no clipping, no EMA.
    "paper": {"batch_size": 32, "lr": 3e-4, "weight_decay": 0.05, "optimizer": "adam", "loss_reduction": "sum",
              "max_timestep": None, "timestep_weighting": "uniform", "warmup_steps": 0, "grad_clip": None,
              "ema_decay": 0.0},
}


def check_trained_timestep(train: TrainConfig, start_step: int, force: bool = False, what: str = "detect") -> None:
    """Refuse to start the sampler at a T' the denoiser never saw in training (unless ``force``)."""
    if train.max_timestep is not None and start_step > train.max_timestep and not force:
        raise ValueError(
            f"{what}: T' = {start_step} is above the largest timestep the model was trained on "
            f"(train.max_timestep = {train.max_timestep}); use T' <= {train.max_timestep}, retrain with a larger "
            f"train.max_timestep, or force it (--force-timestep / force_timestep=True)")


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def timestep_weights(t: torch.Tensor, table: torch.Tensor, weighting: str, gamma: float = 5.0) -> torch.Tensor | None:
    """Per-sample loss weight: None for uniform (every sample counts 1), or min(SNR_t, gamma) / SNR_t for
    epsilon prediction (min-SNR-gamma, Hang et al. 2023), with SNR_t = alpha_t / (1 - alpha_t)."""
    if weighting == "uniform":
        return None
    a = table[t].float()
    snr = a / (1.0 - a)
    return snr.clamp(max=gamma) / snr


def ddpm_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    table: torch.Tensor,
    reduction: str = "sum",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """|| eps_theta(x_t, t) - eps ||^2 (DDPM), summed (the paper) or averaged over pixels, optionally
    weighted per sample, averaged over the batch."""
    xt = q_sample(x0, t, noise, table)
    pred = model(xt, t)
    err = (pred.float() - noise).square()
    per_sample = err.sum(dim=(1, 2, 3)) if reduction == "sum" else err.mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if device.type == "cuda":
        kwargs["fused"] = True
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), **kwargs)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear from 1/warmup to 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay after ``step`` updates: min(decay, (1 + step) / (10 + step)), so that early, poor weights
    are forgotten quickly in short runs."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over parameters and floating-point buffers."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        if b.dtype.is_floating_point:
            b_ema.lerp_(b, 1.0 - decay)
        else:
            b_ema.copy_(b)


@dataclass
class TrainResult:
    epochs_done: int
    last_loss: float
    checkpoint: str
    images_per_second: float
    steps_done: int = 0
    stopped_by: str = "epochs"  # epochs | max_steps | max_minutes


StepHook = Callable[[int, int, float], None]  # (epoch, global step, loss)
clock = time.perf_counter  # the training-time clock (a module attribute, so tests can control it)


def train(
    run: "RunDir",
    config: "RunConfig",
    images: torch.Tensor,
    resume: bool = False,
    progress: bool = True,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train the UNet of ``config.model`` on ``images`` (N, C, H, W in [-1, 1]) into ``run``.

    With ``resume``, continue from the run's latest checkpoint (weights, EMA, optimizer, epoch and the
    step inside it), exactly as an uninterrupted run would. Training ends after ``train.epochs``, or
    earlier at ``train.max_steps`` / ``train.max_minutes`` (saved, and resumable with a larger budget)."""
    from tqdm.auto import tqdm

    tc = config.train
    device = resolve_device(tc.device)
    if images.ndim != 4 or images.shape[1] != config.model.in_channels:
        raise ValueError(f"images must be (N, {config.model.in_channels}, H, W), got {tuple(images.shape)}")
    if images.shape[-1] != config.model.image_size or images.shape[-2] != config.model.image_size:
        raise ValueError(f"images are {tuple(images.shape[-2:])} but the UNet expects {config.model.image_size}")
    n_timesteps = config.schedule.num_timesteps
    if tc.max_timestep is not None and tc.max_timestep >= n_timesteps:
        raise ValueError(f"train.max_timestep = {tc.max_timestep} must be below the schedule's {n_timesteps} steps")
    t_high = n_timesteps if tc.max_timestep is None else tc.max_timestep + 1  # t ~ U{0 .. t_high - 1}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)  # initial weights follow the seed, without touching the caller's RNG
        model = UNet(config.model)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    ema = None
    if tc.ema_decay > 0:
        ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, tc, device)
    table = alphas_cumprod(config.schedule).to(device=device, dtype=torch.float32)
    start_epoch, step, trained_s = 0, 0, 0.0
    if resume:
        path = run.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"--resume: run {run.root} has no checkpoint to resume from")
        ckpt = Checkpoint(path)
        model.load_state_dict(ckpt.state_dict("model"))
        if ema is not None:
            ema.load_state_dict(ckpt.state_dict("ema") if ckpt.has("ema") else ckpt.state_dict("model"))
        opt_state = ckpt.optimizer_state()
        if opt_state is None:
            raise ValueError(f"checkpoint {path} holds no optimizer state and cannot be resumed")
        optimizer.load_state_dict(opt_state)
        start_epoch, step = int(ckpt.info["epoch"]), int(ckpt.info["step"])
        trained_s = float(ckpt.info.get("train_seconds", 0.0))
        run.log(f"resumed from {path.name} (epoch {start_epoch}, step {step})")
    else:
        run.log(f"training started: {len(images)} images, device {device}, precision {tc.precision}")

    n = images.shape[0]
    batch = min(tc.batch_size, n)
    steps_per_epoch = -(-n // batch)
    skip_batches = step - start_epoch * steps_per_epoch  # > 0 when resuming from a mid-epoch checkpoint
    if not 0 <= skip_batches < steps_per_epoch:
        raise ValueError(f"checkpoint step {step} does not fit epoch {start_epoch} of {steps_per_epoch} steps; "
                         f"was the batch size or the training set changed?")
    images_cpu = images.contiguous()
    data_on_device = images_cpu.to(device) if device.type == "cuda" else images_cpu
    model.train()
    last_loss = float("nan")
    last_path = run.latest_checkpoint()
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    marks = set(tc.checkpoint_steps)
    stop: str | None = None  # why training ends early: max_steps | max_minutes
    if tc.max_minutes is not None and trained_s >= 60 * tc.max_minutes:
        stop = "max_minutes"  # resumed with its time budget already spent: nothing to train
    elif step >= total_steps and step < tc.epochs * steps_per_epoch:
        stop = "max_steps"

    def save(epoch_done: int, mid_epoch: bool) -> Path:
        # Step marks and budget ends carry their step in the name, so pruning never removes them.
        named = mid_epoch or step in marks or stop is not None
        path = run.checkpoint_path(epoch_done, step if named else None)
        modules = {"model": model} if ema is None else {"model": model, "ema": ema}
        info = {"epoch": epoch_done, "step": step, "train_seconds": trained_s + clock() - t_start,
                "config": config.to_dict()}
        save_checkpoint(path, modules, info, optimizer)
        return path

    bar = tqdm(total=max(total_steps - step, 0), desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    t_start, seen = clock(), 0
    try:
        for epoch in range(start_epoch, tc.epochs):
            if stop or step >= total_steps:
                break
            gen = torch.Generator().manual_seed(epoch_seed(tc.seed, epoch))
            torch.manual_seed(epoch_seed(tc.seed, epoch) + 1)  # dropout
            perm = torch.randperm(n, generator=gen)
            epoch_loss, t_epoch, done_in_epoch = 0.0, clock(), 0
            for b in range(steps_per_epoch):
                idx = perm[b * batch:(b + 1) * batch]
                t = torch.randint(0, t_high, (len(idx),), generator=gen)
                noise = torch.randn((len(idx), *images.shape[1:]), generator=gen)
                if b < skip_batches:  # resumed mid-epoch: trained before the checkpoint
                    continue
                x0 = data_on_device[idx.to(data_on_device.device)].contiguous(memory_format=memory_format)
                t, noise = t.to(device), noise.to(device)
                for group in optimizer.param_groups:
                    group["lr"] = tc.lr * warmup_factor(step, tc.warmup_steps)
                with autocast(device, tc.precision):
                    weights = timestep_weights(t, table, tc.timestep_weighting, tc.min_snr_gamma)
                    loss = ddpm_loss(model, x0, t, noise, table, tc.loss_reduction, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema_update(ema, model, ema_decay_at(step, tc.ema_decay))
                step += 1
                done_in_epoch += 1
                last_loss = loss.item()
                epoch_loss += last_loss
                seen += len(idx)
                rate = seen / max(clock() - t_start, 1e-9)
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{tc.epochs}", loss=f"{last_loss:.4g}", img_s=f"{rate:.1f}")
                if on_step is not None:
                    on_step(epoch, step, last_loss)
                end_of_epoch = b == steps_per_epoch - 1
                if tc.max_minutes is not None and trained_s + clock() - t_start >= 60 * tc.max_minutes:
                    stop = "max_minutes"
                elif tc.max_steps is not None and step >= tc.max_steps:
                    stop = "max_steps"
                if not end_of_epoch and (stop or step in marks):
                    last_path = save(epoch, mid_epoch=True)
                if stop:
                    break
            skip_batches = 0
            if step == (epoch + 1) * steps_per_epoch:  # the epoch is complete
                done = epoch + 1
                run.log(f"epoch {done} step {step} loss {epoch_loss / max(done_in_epoch, 1):.6g} "
                        f"({done_in_epoch * batch / max(clock() - t_epoch, 1e-9):.2f} img/s)")
                if done % tc.checkpoint_every == 0 or done == tc.epochs or step in marks or stop:
                    last_path = save(done, mid_epoch=False)
                    _prune(run, tc.keep_checkpoints)
            if stop:
                break
    except KeyboardInterrupt:
        bar.close()
        where = f"the checkpoint {last_path}" if last_path else "no checkpoint yet"
        run.log(f"interrupted; last saved: {where}")
        raise
    bar.close()
    rate = seen / max(clock() - t_start, 1e-9)
    epochs_done = step // steps_per_epoch
    stopped_by = stop or "epochs"
    run.log(f"training stopped ({stopped_by}) at step {step}, epoch {epochs_done} ({rate:.2f} img/s)")
    return TrainResult(epochs_done, last_loss, str(last_path), rate, step, stopped_by)


def _prune(run: "RunDir", keep: int) -> None:
    """Keep the newest ``keep`` end-of-epoch checkpoints; mid-epoch (step-mark) checkpoints are kept."""
    if keep <= 0:
        return
    ends = [path for _, path in run.checkpoints() if "-step-" not in path.name]
    for path in ends[:-keep]:
        path.unlink(missing_ok=True)
