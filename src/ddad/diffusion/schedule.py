"""The DDPM noise schedule and forward process (DDAD paper Sec. 3, Eq. 1-2).

Timesteps are the integers the network is trained and called with, t = 0 .. T-1. The noise level of
timestep t is ``alphas_cumprod[t] = prod_{i<=t} (1 - beta_i)`` (the paper's alpha_t); the clean image
has noise level 1, which :func:`alpha_bar` returns for any t < 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear beta schedule of DDPM: T = 1000 steps, beta from 1e-4 to 0.02 (paper Sec. 5.2)."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

    def to_dict(self) -> dict:
        return asdict(self)


def linear_betas(config: ScheduleConfig) -> torch.Tensor:
    """beta_1 < ... < beta_T, evenly spaced (float64 for an exact cumulative product)."""
    return torch.linspace(config.beta_start, config.beta_end, config.num_timesteps, dtype=torch.float64)


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """alpha_t = prod_{i=1}^{t} (1 - beta_i) for t = 1..T, returned 0-indexed (float64)."""
    return torch.cumprod(1.0 - linear_betas(config), dim=0)


def alpha_bar(table: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """Noise level of timestep(s) ``t`` from an ``alphas_cumprod`` table; 1 (clean) where t < 0."""
    t = torch.as_tensor(t, device=table.device)
    return torch.where(t >= 0, table[t.clamp(min=0)], torch.ones((), dtype=table.dtype, device=table.device))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x) = N(sqrt(alpha_t) x, (1 - alpha_t) I) (Sec. 3), per sample t."""
    a = alpha_bar(table, t).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise
