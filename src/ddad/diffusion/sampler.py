"""Conditioned denoising: DDAD's reconstruction process (paper Algorithm 1, Eq. 6-7).

The input x is perturbed to timestep T' and denoised with a DDIM update in which the predicted noise
is corrected toward the target y. The parts are small functions: :func:`ddim_step` (one update),
:func:`target_guidance` (Eq. 6) and :func:`denoise_loop` (the steps, with an optional per-step hook and
every step's predicted x0, which inpainting methods use); :func:`conditioned_denoise` is Algorithm 1.

    y_t   = sqrt(a_t) y + sqrt(1 - a_t) eps_theta(x_t, t)                         (Alg. 1, line 3)
    eps^  = eps_theta(x_t, t) - w sqrt(1 - a_t) (y_t - x_t)                        (Eq. 6)
    f^    = (x_t - sqrt(1 - a_t) eps^) / sqrt(a_t)                                  (Eq. 2)
    x_t'  = sqrt(a_t') f^ + sqrt(1 - a_t' - sigma_t^2) eps^ + sigma_t eps_t          (Eq. 7)
    sigma_t = eta sqrt((1 - a_t') / (1 - a_t)) sqrt(1 - a_t / a_t')                 (DDIM)

where t' is the next (smaller) timestep. With w = 0 this is plain DDIM; with eta = 0 it is
deterministic given the initial noise.

Differences from the authors' code, each deliberate:
  * the first network call is at T' itself, the level x was noised to (their code noises to T' and
    calls the network at T' - skip; :attr:`SamplerConfig.authors_first_step` reproduces that);
  * every image draws its noise from its own seeded generator, so its reconstruction does not depend
    on the other images in its batch, on the batch size, or on the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch

from ddad_infer.noise import image_seed as seed_of
from ddad_infer.sampler import denoising_steps as steps_from

from .schedule import alpha_bar

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of Algorithm 1. ``DDAD-n`` uses ``n = ceil(start_step / skip)`` network calls."""

    start_step: int = 250  # T'
    skip: int = 25
    w: float = 3.0
    eta: float = 1.0
    authors_first_step: bool = False

    def __post_init__(self) -> None:
        if self.start_step < 1:
            raise ValueError(f"start_step (T') must be >= 1, got {self.start_step}")
        if not 1 <= self.skip <= self.start_step:
            raise ValueError(f"skip must be in [1, start_step={self.start_step}], got {self.skip}")
        if self.w < 0:
            raise ValueError(f"w must be >= 0, got {self.w}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")

    @property
    def num_steps(self) -> int:
        return len(denoising_steps(self))

    def to_dict(self) -> dict:
        return asdict(self)


def skip_for_steps(start_step: int, steps: int) -> int:
    """The ``skip`` that gives DDAD-``steps`` from ``start_step`` (e.g. 250, 10 -> 25)."""
    if not 1 <= steps <= start_step:
        raise ValueError(f"steps must be in [1, {start_step}], got {steps}")
    return -(-start_step // steps)


def denoising_steps(config: SamplerConfig) -> list[tuple[int, int]]:
    """Pairs (t, t_next) of network timestep and the timestep it steps to; t_next = -1 is clean
    (:func:`ddad_infer.sampler.denoising_steps`: ours from T', or the authors' from T' - skip)."""
    return steps_from(config.start_step, config.skip, config.authors_first_step)


def image_seed(image: torch.Tensor, seed: int) -> int:
    """A per-image noise seed from the image's content and the run seed: the same image gets the same
    noise in ``ddad test``, ``ddad predict`` and an exported model, alone or in any batch."""
    return seed_of(image.detach().float().cpu().contiguous().numpy(), seed)


def per_image_noise(seeds: Sequence[int], shape: Sequence[int], draws: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """(draws, B, *shape) standard Gaussian noise; image i's comes from its own CPU generator seeded
    with ``seeds[i]``, so it is the same whatever batch the image is in and whichever device runs the
    model. All of it is drawn up front and moved to ``device`` in one copy (no transfer per step)."""
    per_image = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s))
        per_image.append(torch.randn((draws, *shape), generator=g, dtype=torch.float32))
    return torch.stack(per_image, dim=1).to(device)


@dataclass
class DDIMStepOutput:
    prev_sample: torch.Tensor  # x_t' (t' the next, smaller timestep)
    pred_original_sample: torch.Tensor  # the x0 predicted at this step (Eq. 2)


def ddim_step(
    xt: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_next: torch.Tensor, eta: float,
    noise: torch.Tensor | None = None,
) -> DDIMStepOutput:
    """One DDIM update from x_t to x_t' given the (possibly guided) noise estimate ``eps``:

        f     = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                                   (Eq. 2)
        x_t'  = sqrt(a_t') f + sqrt(1 - a_t' - sigma_t^2) eps + sigma_t noise           (Eq. 7)

    ``noise`` is None for the deterministic part only (eta = 0, or the last step)."""
    x0_pred = (xt - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # Eq. 2
    sigma = eta * ((1 - a_next) / (1 - a_t)).sqrt() * (1 - a_t / a_next).sqrt()
    prev = a_next.sqrt() * x0_pred + (1 - a_next - sigma**2).clamp(min=0).sqrt() * eps  # Eq. 7
    if noise is not None:
        prev = prev + sigma * noise
    return DDIMStepOutput(prev, x0_pred)


def target_guidance(y: torch.Tensor, w: float) -> "Guidance":
    """DDAD's conditioning on the target y (Alg. 1 line 3 and Eq. 6) as a guidance function:

        y_t  = sqrt(a_t) y + sqrt(1 - a_t) eps_theta(x_t, t)
        eps^ = eps_theta(x_t, t) - w sqrt(1 - a_t) (y_t - x_t)"""

    def guide(xt: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        yt = a_t.sqrt() * y + (1 - a_t).sqrt() * eps  # Alg. 1, line 3
        return eps - w * (1 - a_t).sqrt() * (yt - xt)  # Eq. 6

    return guide


Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, eps, a_t) -> eps^
# Called after every step with (step index, t, x_t', predicted x0); may return a replacement for x_t'
# (e.g. known pixels, for inpainting), or None to keep it.
StepHook = Callable[[int, int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass
class DenoiseOutput:
    sample: torch.Tensor  # the final x_0
    pred_original_samples: list[torch.Tensor]  # the predicted x0 of every step (when asked for)


def denoise_loop(
    denoiser: Denoiser,
    xt: torch.Tensor,
    table: torch.Tensor,
    steps: Sequence[tuple[int, int]],
    eta: float,
    noise: Iterator[torch.Tensor] | None = None,
    guidance: Guidance | None = None,
    on_step: StepHook | None = None,
    keep_x0: bool = False,
) -> DenoiseOutput:
    """Apply :func:`ddim_step` over ``steps`` ((t, t_next) pairs, see :func:`denoising_steps`) from ``xt``.

    ``noise`` yields the fresh noise of each stochastic step (eta > 0 and t_next >= 0); ``guidance``
    corrects each noise estimate before the update; ``on_step`` sees (and may replace) every x_t'."""
    batch = xt.shape[0]
    x0s: list[torch.Tensor] = []
    for i, (t, t_next) in enumerate(steps):
        a_t, a_next = alpha_bar(table, t), alpha_bar(table, t_next)
        eps = denoiser(xt, torch.full((batch,), t, device=xt.device, dtype=torch.long)).float()
        if guidance is not None:
            eps = guidance(xt, eps, a_t)
        stochastic = eta > 0 and t_next >= 0
        out = ddim_step(xt, eps, a_t, a_next, eta, next(noise) if stochastic and noise is not None else None)
        xt = out.prev_sample
        if on_step is not None:
            replaced = on_step(i, t, xt, out.pred_original_sample)
            xt = xt if replaced is None else replaced
        if keep_x0:
            x0s.append(out.pred_original_sample)
    return DenoiseOutput(xt, x0s)


def conditioned_denoise(
    denoiser: Denoiser,
    x: torch.Tensor,
    y: torch.Tensor,
    table: torch.Tensor,
    config: SamplerConfig,
    seeds: Sequence[int],
) -> torch.Tensor:
    """Algorithm 1: reconstruct ``x`` from T' with the denoising conditioned on ``y``.

    ``x``, ``y``: (B, C, H, W) in [-1, 1]; ``table``: ``alphas_cumprod`` on x's device;
    ``seeds``: one per image. Returns the reconstruction x_0 (float32)."""
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(seeds) != x.shape[0]:
        raise ValueError(f"need one seed per image: {len(seeds)} seeds for {x.shape[0]} images")
    if config.start_step >= table.numel():
        raise ValueError(f"start_step {config.start_step} is outside the schedule of {table.numel()} steps")
    device = x.device
    x, y = x.float(), y.float()
    table = table.to(device=device, dtype=torch.float32)
    steps = denoising_steps(config)
    stochastic = sum(config.eta > 0 and t_next >= 0 for _, t_next in steps)
    noise = iter(per_image_noise(seeds, x.shape[1:], 1 + stochastic, device))
    a_start = alpha_bar(table, config.start_step)
    xt = a_start.sqrt() * x + (1 - a_start).sqrt() * next(noise)  # Alg. 1, line 1
    return denoise_loop(denoiser, xt, table, steps, config.eta, noise, target_guidance(y, config.w)).sample
