"""DDAD's reconstruction (Algorithm 1, Eq. 6-7) in numpy around an exported noise predictor: the same
steps, guidance, DDIM update and per-image noise as :mod:`ddad.diffusion.sampler`, whose docstring has the
equations; a test holds the two to 1e-5.

    y_t  = sqrt(a_t) y + sqrt(1 - a_t) eps_theta(x_t, t)                          (Alg. 1, line 3)
    eps^ = eps_theta(x_t, t) - w sqrt(1 - a_t) (y_t - x_t)                         (Eq. 6)
    f^   = (x_t - sqrt(1 - a_t) eps^) / sqrt(a_t)                                   (Eq. 2)
    x_t' = sqrt(a_t') f^ + sqrt(1 - a_t' - sigma_t^2) eps^ + sigma_t eps_t           (Eq. 7)
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .noise import torch_randn

F32 = np.float32
Denoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x_t (B, C, H, W) float32, t (B,) int64) -> eps


def denoising_steps(start_step: int, skip: int, authors_first_step: bool = False) -> list[tuple[int, int]]:
    """Pairs (t, t_next) of network timestep and the timestep it steps to; t_next = -1 is clean.

    Ours: t = T', T' - skip, ... while t > 0, and the last step lands on the clean image.
    Authors': t = T' - skip, ..., 0 after noising to T' (the first call one step too low)."""
    if authors_first_step:
        ts = list(range(0, start_step, skip))[::-1]
        return [(t, t - skip if t - skip >= 0 else -1) for t in ts]
    ts = list(range(start_step, 0, -skip))
    return [(t, t - skip if t - skip > 0 else -1) for t in ts]


def reconstruct(denoiser: Denoiser, images: np.ndarray, table: np.ndarray, seeds: Sequence[int], start_step: int,
                skip: int, w: float, eta: float, authors_first_step: bool = False) -> np.ndarray:
    """x_0 of Algorithm 1 for ``images`` (B, C, H, W) in [-1, 1], conditioned on themselves; ``table`` is
    alphas_cumprod (float32), ``seeds`` one per image (:func:`ddad_infer.noise.image_seed`)."""
    x = np.ascontiguousarray(images, dtype=F32)
    if len(seeds) != len(x):
        raise ValueError(f"need one seed per image: {len(seeds)} seeds for {len(x)} images")
    table = np.asarray(table, dtype=F32)
    steps = denoising_steps(start_step, skip, authors_first_step)
    stochastic = sum(eta > 0 and t_next >= 0 for _, t_next in steps)
    noise = np.stack([torch_randn(s, (1 + stochastic, *x.shape[1:])) for s in seeds], axis=1)
    alpha = lambda t: table[t] if t >= 0 else F32(1.0)  # noqa: E731
    a_start = alpha(start_step)
    xt = np.sqrt(a_start) * x + np.sqrt(F32(1) - a_start) * noise[0]  # Alg. 1, line 1
    draw = 1
    for t, t_next in steps:
        a_t, a_next = alpha(t), alpha(t_next)
        eps = np.asarray(denoiser(xt, np.full(len(x), t, dtype=np.int64)), dtype=F32)
        yt = np.sqrt(a_t) * x + np.sqrt(F32(1) - a_t) * eps  # Alg. 1, line 3
        eps = eps - F32(w) * np.sqrt(F32(1) - a_t) * (yt - xt)  # Eq. 6
        x0 = (xt - np.sqrt(F32(1) - a_t) * eps) / np.sqrt(a_t)  # Eq. 2
        sigma = F32(eta) * np.sqrt((F32(1) - a_next) / (F32(1) - a_t)) * np.sqrt(F32(1) - a_t / a_next)
        xt = np.sqrt(a_next) * x0 + np.sqrt(max(F32(1) - a_next - sigma ** 2, F32(0))) * eps  # Eq. 7
        if eta > 0 and t_next >= 0:
            xt = xt + sigma * noise[draw]
            draw += 1
    return xt.astype(F32)
