"""DRDC's diffusion refinement in numpy around its exported graphs: the same masks, noise, inpainting loop and
set combination as :mod:`ddad.diffusion.inpainting` and :class:`ddad.methods.drdc.refiner.Refiner` (whose
docstrings have the equations); a test holds the two to the exported models' tolerance.

    c      = (1 - M) x + M n                               the condition (Eq. 10)
    x_T'   = sqrt(a_T') x + sqrt(1 - a_T') eps              the start (Eq. 4)
    x0_t   = (x_t - sqrt(1 - a_t) eps_theta(x_t, t, c)) / sqrt(a_t)
    x_t'   = (1 - M) (sqrt(a_t') x + sqrt(1 - a_t') n_t') + M (sqrt(a_t') x0_t + sqrt(1 - a_t') eps_theta)
                                                            deterministic DDIM, known pixels (Eq. 11-13)
    x^_t   = sum_k M_k x0_t,k                               the sets combined (Eq. 8)

An image's masks are ``torch.randperm`` draws of a CPU generator seeded with the image's seed: torch shuffles
0..n-1 by swapping position i with i + (r mod (n - i)), r the generator's next 32-bit word, which is numpy's
MT19937 stream under the same seeding (:mod:`ddad_infer.noise`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .noise import image_seed, torch_randn

F32 = np.float32
GRAPHS = ("refine_input", "refine_unet", "refine_map")


def job_seed(seed: int, job: int) -> int:
    """The seed of an image's ``job``-th inpainting (specification-major, then set) from the image's seed
    (ddad's refiner draws with this rule too)."""
    return (seed + 1_000_003 * (job + 1)) % (2**63 - 1)


def torch_randperms(seed: int, sizes: Sequence[int]) -> list[np.ndarray]:
    """``[torch.randperm(n, generator=g) for n in sizes]`` with ``g = torch.Generator().manual_seed(seed)``."""
    generator = np.random.MT19937(0)
    generator._legacy_seeding(int(seed) & 0xFFFFFFFF)  # init_genrand, as torch seeds its CPU generator
    out = []
    for n in sizes:
        perm = np.arange(n)
        words = generator.random_raw(max(n - 1, 0))
        for i in range(n - 1):
            j = i + int(words[i]) % (n - i)
            perm[i], perm[j] = perm[j], perm[i]
        out.append(perm)
    return out


def inpainting_masks(seed: int, height: int, width: int, cells: Sequence[int], sets: int) -> np.ndarray:
    """(specifications, sets, 1, H, W) float32 masks of one image, as ``Refiner.masks``: per cell size g, the
    g x g cells in a random order dealt in turn to the ``sets`` sets (1 = hidden)."""
    grids = [(height // g, width // g) for g in cells]
    perms = torch_randperms(seed, [rows * cols for rows, cols in grids])
    out = np.zeros((len(cells), sets, 1, height, width), dtype=F32)
    for s, (g, (rows, cols), perm) in enumerate(zip(cells, grids, perms)):
        owner = np.empty(rows * cols, dtype=np.int64)
        owner[perm] = np.arange(rows * cols) % sets
        grid = owner.reshape(rows, cols).repeat(g, axis=0).repeat(g, axis=1)
        out[s, :, 0] = grid[None] == np.arange(sets)[:, None, None]
    return out


Denoiser = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]  # (x_t, t, c) -> eps


def inpaint(denoiser: Denoiser, x: np.ndarray, hidden: np.ndarray, table: np.ndarray,
            steps: Sequence[Sequence[int]], noise: np.ndarray, model_conditioning: bool = True,
            test_time_conditioning: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
    """(final image, each step's predicted x0) of inpainting the ``hidden`` pixels (N, 1, H, W) of ``x``
    (N, C, H, W); ``noise`` (draws, N, C, H, W): the condition's, the start's, then each step's that lands on
    t >= 0 (:class:`ddad.diffusion.inpainting.InpaintingNoise`)."""
    alpha = lambda t: table[t] if t >= 0 else F32(1.0)  # noqa: E731
    c = (1 - hidden) * x + hidden * noise[0]  # Eq. 10
    a = alpha(steps[0][0])
    xt = np.sqrt(a) * x + np.sqrt(F32(1) - a) * noise[1]  # Eq. 4 at T'
    cond = c if model_conditioning else None
    x0s, draw = [], 2
    for t, t_next in steps:
        a_t, a_next = alpha(t), alpha(t_next)
        eps = np.asarray(denoiser(xt, np.full(len(x), t, dtype=np.int64), cond), dtype=F32)
        x0 = (xt - np.sqrt(F32(1) - a_t) * eps) / np.sqrt(a_t)  # Eq. 2
        xt = np.sqrt(a_next) * x0 + np.sqrt(max(F32(1) - a_next, F32(0))) * eps  # DDIM, eta = 0
        if test_time_conditioning:
            known = x
            if t_next >= 0:  # Eq. 11
                known = np.sqrt(a_next) * x + np.sqrt(F32(1) - a_next) * noise[draw]
            xt = (1 - hidden) * known + hidden * xt  # Eq. 13
        if t_next >= 0:
            draw += 1
        x0s.append(x0)
    return xt.astype(F32), x0s


class Refinement:
    """The refinement of an exported DRDC model (its manifest's ``refinement`` and the graphs of
    :data:`GRAPHS`): images at the model's size and their scaled base maps -> fused map, score,
    reconstruction."""

    def __init__(self, settings: dict, graphs: dict) -> None:
        self.cells, self.sets = list(settings["cells"]), int(settings["sets"])
        self.steps = [tuple(step) for step in settings["steps"]]
        self.seed, self.table = int(settings["seed"]), np.asarray(settings["alphas_cumprod"], dtype=F32)
        self.model_conditioning = bool(settings["model_conditioning"])
        self.test_time_conditioning, self.fusion = bool(settings["test_time_conditioning"]), bool(settings["fusion"])
        self.graphs = graphs

    def _denoise(self, xt: np.ndarray, t: np.ndarray, cond: np.ndarray | None) -> np.ndarray:
        feeds = {"x": xt, "t": t} if cond is None else {"x": xt, "t": t, "cond": cond}
        return self.graphs["refine_unet"](feeds)[0]

    def __call__(self, images: np.ndarray, base: np.ndarray) -> dict:
        b = len(images)
        seeds = [image_seed(img, self.seed) for img in images]  # from the image as given, as ddad seeds it
        x = np.asarray(self.graphs["refine_input"]({"image": images})[0], dtype=F32)
        _, c, h, w = x.shape
        specs, sets = len(self.cells), self.sets
        jobs = specs * sets
        masks = np.stack([inpainting_masks(s, h, w, self.cells, sets) for s in seeds])  # (B, S, n, 1, H, W)
        draws = 2 + sum(t_next >= 0 for _, t_next in self.steps)
        noise = np.stack([torch_randn(job_seed(s, j), (draws, c, h, w)) for s in seeds for j in range(jobs)], axis=1)
        hidden = masks.reshape(b * jobs, 1, h, w)
        final, x0s = inpaint(self._denoise, np.repeat(x, jobs, axis=0), hidden, self.table, self.steps, noise,
                             self.model_conditioning, self.test_time_conditioning)

        def combined(prediction: np.ndarray) -> np.ndarray:  # Eq. 8 -> (B, S, C, H, W)
            return (prediction.reshape(b, specs, sets, c, h, w) * masks).sum(axis=2)

        last = combined(final)
        predictions = np.stack([combined(p) for p in x0s] if self.fusion else [last], axis=2)
        maps, scores, reconstruction = self.graphs["refine_map"](
            {"x": x, "predictions": predictions.astype(F32), "inpainted": last[:, 0], "base": base})
        return {"score": scores, "anomaly_map": maps, "reconstruction": reconstruction}
