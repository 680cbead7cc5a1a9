"""How each optimizer step is taken, whatever the model: the training settings (:class:`TrainConfig`),
the recipes, the optimizer, learning-rate warm-up, the exponential moving average of the weights, and the
seed of each epoch.

Two recipes (:data:`RECIPES`). ``paper`` (DDAD Sec. 5.2, App. 7): t uniform over all 1000 steps, the error
summed over pixels, Adam lr 3e-4 with weight decay 0.05 as L2 in the gradient, batch 32. ``default``
(ddad's): t uniform in [0, T'max] (the sampler never visits a larger t), the error averaged over pixels,
AdamW lr 1e-3 with a 100-step warm-up and gradient clipping, batch 16, and an EMA of the weights, which
detection uses (BENCHMARKS.md, "Sample-efficient training", has the figures).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..diffusion.objective import LOSS_REDUCTIONS, TIMESTEP_WEIGHTINGS
from ..runtime import PRECISIONS

OPTIMIZERS = ("adam", "adamw")


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
    lr_decay_epochs: tuple[int, ...] = ()  # step decay: the learning rate is multiplied by lr_decay at each
    lr_decay: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    ema_decay: float = 0.999  # EMA of the weights used for detection (0: none); warm-up (1+n)/(10+n)
    seed: int = 0
    checkpoint_every: int = 50  # epochs; the last epoch is always saved
    # also save after this much training time since the last save (replaced by the next one; None: never)
    checkpoint_minutes: float | None = 10.0
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
        if any(e < 1 for e in self.lr_decay_epochs) or not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay_epochs must be >= 1 and lr_decay in (0, 1], got {self.lr_decay_epochs}, "
                             f"{self.lr_decay}")
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
        if self.checkpoint_minutes is not None and self.checkpoint_minutes <= 0:
            raise ValueError(f"checkpoint_minutes must be > 0 (or null), got {self.checkpoint_minutes}")
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

    def timestep_high(self, n_timesteps: int) -> int:
        """t_high of the DDPM objective (t ~ U{0 .. t_high - 1}) in a schedule of ``n_timesteps`` steps."""
        if self.max_timestep is not None and self.max_timestep >= n_timesteps:
            raise ValueError(f"train.max_timestep = {self.max_timestep} must be below the schedule's {n_timesteps} steps")
        return n_timesteps if self.max_timestep is None else self.max_timestep + 1


def check_trained_timestep(train: TrainConfig, start_step: int, force: bool = False, what: str = "detect") -> None:
    """Refuse to start a sampler at a T' the denoiser never saw in training (unless ``force``)."""
    if train.max_timestep is not None and start_step > train.max_timestep and not force:
        raise ValueError(
            f"{what}: T' = {start_step} is above the largest timestep the model was trained on "
            f"(train.max_timestep = {train.max_timestep}); use T' <= {train.max_timestep}, retrain with a larger "
            f"train.max_timestep, or force it (--force-timestep / force_timestep=True)")


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


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if device.type == "cuda":
        kwargs["fused"] = True
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), **kwargs)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear from 1/warmup to 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def learning_rate(config: TrainConfig, step: int, epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) in epoch ``epoch`` (0-based): warm-up, then
    multiplied by ``lr_decay`` at each of ``lr_decay_epochs`` reached."""
    decays = sum(epoch >= e for e in config.lr_decay_epochs)
    return config.lr * warmup_factor(step, config.warmup_steps) * config.lr_decay ** decays


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
