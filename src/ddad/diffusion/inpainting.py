"""Inpainting with a denoising diffusion model (DRDC paper Sec. 4.2-4.3, Eq. 7-13; RePaint's known-region
replacement with a deterministic DDIM sampler).

Masks (Sec. 4.2): the image is cut into cells of g x g pixels; the cells are split at random, uniformly,
into n disjoint sets of (almost) equal size; set k's mask M_k hides its cells (1 = hidden). Every pixel is
hidden by exactly one set, so the sets' predictions over their own hidden cells make one full image:

    x^ = sum_k M_k * x0_k                                                                 (Eq. 8)

Conditions (Sec. 4.3):
    c      = (1 - M) * x + M * n,  n ~ N(0, I)             the model's condition, concatenated to x_t (Eq. 10)
    x_t^kn = sqrt(a_t) x + sqrt(1 - a_t) eps                the known pixels at step t (Eq. 11)
    x_t^un = DDIM step of the model from x_{t+1}            the unknown pixels (Eq. 12)
    x_t    = (1 - M) * x_t^kn + M * x_t^un                  test-time conditioning (Eq. 13)

The reverse process starts from the input noised to the initial index T' by the forward process (Eq. 4,
as Eq. 7 reads: "predict the masked region at timestep t ... according to Eq. 4") and runs
:func:`ddad.diffusion.sampler.denoise_loop` with Eq. 13 as its after-step hook; the hidden cells' content
reaches the model only through x_t, which at T' = 250 still carries sqrt(a_t) = 0.75 of it, while c hides it.
The other reading, starting from c noised (hidden cells hold only noise, ``start_from_condition``), fails
with a model trained by DDPM's objective, which never sees such an x_t: measured on the unified benchmark
(BENCHMARKS.md), the hidden cells come back with a mean error of 0.40 against 0.08 from the input. Every random draw
of an image comes from its own seed, so its inpainting does not depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .sampler import DenoiseOutput, StepHook, denoise_loop, per_image_noise
from .schedule import alpha_bar, q_sample


def inpainting_masks(height: int, width: int, cell: int, sets: int, generator: torch.Generator) -> torch.Tensor:
    """(sets, 1, height, width) float masks, 1 on the hidden pixels of each set: the g x g cells (g = ``cell``)
    in a random order from ``generator``, dealt in turn to the ``sets`` sets (Sec. 4.2)."""
    if cell < 1 or height % cell or width % cell:
        raise ValueError(f"inpainting cell {cell} must divide the image size {height} x {width}")
    rows, cols = height // cell, width // cell
    if not 1 <= sets <= rows * cols:
        raise ValueError(f"sets must be in [1, {rows * cols}] (the number of {cell}-pixel cells), got {sets}")
    owner = torch.empty(rows * cols, dtype=torch.long)
    owner[torch.randperm(rows * cols, generator=generator)] = torch.arange(rows * cols) % sets
    grid = owner.view(rows, cols).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return (grid[None] == torch.arange(sets).view(sets, 1, 1)).float().unsqueeze(1)


def masked_condition(x: torch.Tensor, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """c: the image with its hidden pixels replaced by Gaussian noise, not by a binary mask (Eq. 10)."""
    return (1 - hidden) * x + hidden * noise


def combine_sets(predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Eq. 8: (sets, B, C, H, W) predictions and (sets, B, 1, H, W) masks -> each set's hidden pixels."""
    return (predictions * masks).sum(dim=0)


@dataclass
class InpaintingNoise:
    """An image batch's draws, each image's from its own seed: the noise of the condition's hidden pixels,
    the forward noise to T', and the known region's noise at each step that lands on t >= 0 (Eq. 11)."""

    condition: torch.Tensor
    start: torch.Tensor
    known: list[torch.Tensor]

    @classmethod
    def draw(cls, seeds: Sequence[int], shape: Sequence[int], steps: Sequence[tuple[int, int]],
             device: torch.device | str = "cpu") -> "InpaintingNoise":
        noisy_steps = sum(t_next >= 0 for _, t_next in steps)
        draws = per_image_noise(seeds, shape, 2 + noisy_steps, device)
        return cls(draws[0], draws[1], list(draws[2:]))


def known_region_hook(x: torch.Tensor, hidden: torch.Tensor, table: torch.Tensor,
                      steps: Sequence[tuple[int, int]], noise: Sequence[torch.Tensor]) -> StepHook:
    """Test-time conditioning (Eq. 11-13) as :func:`denoise_loop`'s after-step hook: the known pixels of
    x_t' become x noised to t' by the forward process (x itself at the last step)."""
    noise_of_step = {}
    for i, (_, t_next) in enumerate(steps):
        if t_next >= 0:
            noise_of_step[i] = noise[len(noise_of_step)]

    def hook(i: int, t: int, x_next: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        t_next = steps[i][1]
        if t_next < 0:
            known = x
        else:
            known = q_sample(x, torch.full((x.shape[0],), t_next, device=x.device), noise_of_step[i], table)  # Eq. 11
        return (1 - hidden) * known + hidden * x_next  # Eq. 13

    return hook


ConditionedDenoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def inpaint(
    denoiser: ConditionedDenoiser,
    x: torch.Tensor,
    hidden: torch.Tensor,
    table: torch.Tensor,
    steps: Sequence[tuple[int, int]],
    noise: InpaintingNoise,
    model_conditioning: bool = True,
    test_time_conditioning: bool = True,
    start_from_condition: bool = False,
) -> DenoiseOutput:
    """Inpaint the ``hidden`` pixels (B, 1, H, W; 1 = hidden) of ``x`` (B, C, H, W in [-1, 1]) with
    deterministic DDIM over ``steps`` ((t, t_next) pairs from T' down to -1). ``denoiser(x_t, t, c)`` gets
    the condition c (Eq. 10) with ``model_conditioning``, else None. Returns the final image and every
    step's predicted x0 (the temporal heatmaps of Eq. 9 use them)."""
    x = x.float()
    table = table.to(device=x.device, dtype=torch.float32)
    c = masked_condition(x, hidden, noise.condition)
    t_start = steps[0][0]
    a = alpha_bar(table, t_start)
    xt = a.sqrt() * (c if start_from_condition else x) + (1 - a).sqrt() * noise.start  # Eq. 4 at T'
    cond = c if model_conditioning else None
    hook = known_region_hook(x, hidden, table, steps, noise.known) if test_time_conditioning else None
    return denoise_loop(lambda xt_, t: denoiser(xt_, t, cond), xt, table, steps, eta=0.0, on_step=hook,
                        keep_x0=True)


@dataclass
class InpaintingObjective:
    """DDPM epsilon prediction (Eq. 10) for a denoiser conditioned on c: each training image gets a random
    cell size from ``cells``, a random split into ``sets`` sets and one of them hidden, all drawn from the
    engine's generator. t is uniform in [0, t_high - 1]; the squared error is averaged over pixels."""

    table: torch.Tensor
    t_high: int
    cells: tuple[int, ...]
    sets: int

    def draw(self, n: int, sample_shape: Sequence[int], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        t = torch.randint(0, self.t_high, (n,), generator=generator)
        noise = torch.randn((n, *sample_shape), generator=generator)
        cond_noise = torch.randn((n, *sample_shape), generator=generator)
        height, width = sample_shape[-2:]
        hidden = []
        for _ in range(n):
            cell = self.cells[int(torch.randint(len(self.cells), (1,), generator=generator))]
            masks = inpainting_masks(height, width, cell, self.sets, generator)
            hidden.append(masks[int(torch.randint(self.sets, (1,), generator=generator))])
        return t, noise, cond_noise, torch.stack(hidden)

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        t, noise, cond_noise, hidden = draws
        xt = q_sample(x0, t, noise, self.table)
        pred = model(xt, t, masked_condition(x0, hidden, cond_noise))
        return (pred.float() - noise).square().mean()
