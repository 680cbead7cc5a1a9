"""The DDPM training objective (Ho et al. 2020; DDAD paper Sec. 3, Eq. 1-2): epsilon prediction,

    L = || eps_theta(x_t, t) - eps ||^2,  x_t = sqrt(a_t) x + sqrt(1 - a_t) eps,  t ~ U{0 .. t_high - 1}

averaged over the batch; the squared error summed (the paper) or averaged over pixels, optionally weighted
per timestep (min-SNR-gamma, Hang et al. 2023). :class:`DDPMObjective` is what the training engine calls:
it draws a batch's random inputs from the epoch's generator, then computes the loss from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .schedule import q_sample

LOSS_REDUCTIONS = ("sum", "mean")
TIMESTEP_WEIGHTINGS = ("uniform", "min-snr")


def timestep_weights(t: torch.Tensor, table: torch.Tensor, weighting: str, gamma: float = 5.0) -> torch.Tensor | None:
    """Per-sample loss weight: None for uniform (every sample counts 1), or min(SNR_t, gamma) / SNR_t for
    epsilon prediction (min-SNR-gamma), with SNR_t = alpha_t / (1 - alpha_t)."""
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
    """|| eps_theta(x_t, t) - eps ||^2, summed (the paper) or averaged over pixels, optionally weighted per
    sample, averaged over the batch."""
    xt = q_sample(x0, t, noise, table)
    pred = model(xt, t)
    err = (pred.float() - noise).square()
    per_sample = err.sum(dim=(1, 2, 3)) if reduction == "sum" else err.mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


@dataclass
class DDPMObjective:
    """Epsilon prediction with t uniform in [0, t_high - 1] (see module docstring)."""

    table: torch.Tensor  # alphas_cumprod, on the training device
    t_high: int
    reduction: str = "mean"
    weighting: str = "uniform"
    gamma: float = 5.0

    def draw(self, n: int, sample_shape: Sequence[int], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """The random inputs of a batch of ``n``: timesteps, then noise (in this order, from ``generator``)."""
        t = torch.randint(0, self.t_high, (n,), generator=generator)
        noise = torch.randn((n, *sample_shape), generator=generator)
        return t, noise

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        t, noise = draws
        weights = timestep_weights(t, self.table, self.weighting, self.gamma)
        return ddpm_loss(model, x0, t, noise, self.table, self.reduction, weights)
