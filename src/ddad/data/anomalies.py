"""Synthetic anomalies on defect-free images, for choosing thresholds and settings where no real defects are
at hand. Two kinds here (the recipe of DRAEM, Zavrtanik et al. 2021, and CutPaste's pasted patches, Li et al.
2021), six more in :mod:`ddad.data.defects` (patches of other images Poisson-blended in, scratches, scars,
warps, blobs, colour changes), all mixed by default:

- ``perlin``: a Perlin-noise region (noise of a random scale 2^0..2^5 cells per side, thresholded at 0.5)
  filled with a texture blended in: x' = (1 - M) x + M ((1 - b) s + b x), b ~ U(0, 0.8) (DRAEM, Eq. 1;
  the texture s is the image itself turned by 180 degrees and shifted at random, instead of DTD, which ddad
  does not download);
- ``paste``: a rectangle of the image pasted at another random place (CutPaste).

An image's anomaly depends only on the seed, the image itself and the pool of donor images given for it
(``patch``: the category's training images; none given: the image itself): its draws come from
``numpy.random.default_rng((seed, key))`` with ``key`` a hash of its pixels, so the same image gets the same
anomaly alone, in any subset of its set and in any order. An image whose own texture cannot change it (a
uniform tile) gets, after a few draws, a Perlin-shaped stain of the far end of the value range instead. Where
an object's region is given, pixels outside it are never changed. The returned mask is exactly the set of
changed pixels. No maintained pip package offers these without a deep-learning framework of its own, so they
are here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .defects import LOCAL_KINDS

KINDS = ("perlin", "paste", *LOCAL_KINDS)
SELF_TEXTURE_ATTEMPTS = 8  # draws from the image's own texture before a stain is blended in instead


def perlin_noise(height: int, width: int, cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(height, width) 2-D Perlin gradient noise with ``cells`` = (rows, cols) lattice cells, about in [-1, 1]."""
    ry, rx = cells
    gy, gx = -(-height // ry) * ry, -(-width // rx) * rx  # a multiple of the lattice, cropped at the end
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.arange(gy) / (gy / ry)
    x = np.arange(gx) / (gx / rx)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grads[yi[:, None] + dy, xi[None, :] + dx]
        return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(xf), fade(yf)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return (np.sqrt(2) * (top * (1 - v) + bottom * v))[:height, :width]


def perlin_region(height: int, width: int, rng: np.random.Generator, threshold: float = 0.5) -> np.ndarray:
    """A boolean region: Perlin noise of a random scale above ``threshold`` (redrawn until it is not empty)."""
    while True:
        cells = (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6)))
        region = perlin_noise(height, width, cells, rng) > threshold
        if region.any():
            return region


def pasted_region(height: int, width: int, rng: np.random.Generator) -> tuple[slice, slice, slice, slice]:
    """(target rows, target cols, source rows, source cols) of a rectangle of 2-15 % of each side squared."""
    area = rng.uniform(0.02, 0.15) * height * width
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    h = int(np.clip(round(np.sqrt(area * aspect)), 1, height))
    w = int(np.clip(round(np.sqrt(area / aspect)), 1, width))
    ty, tx, sy, sx = (int(rng.integers(0, n - s + 1)) for n, s in ((height, h), (width, w), (height, h), (width, w)))
    return slice(ty, ty + h), slice(tx, tx + w), slice(sy, sy + h), slice(sx, sx + w)


class SyntheticBatch(NamedTuple):
    images: torch.Tensor  # (N, C, H, W) the altered images
    masks: torch.Tensor  # (N, 1, H, W) 0/1: exactly the changed pixels
    kinds: list[str]  # the kind of each image's anomaly


@dataclass(frozen=True)
class SyntheticAnomalies:
    """Which anomalies to make, and the seed they are drawn from."""

    kinds: tuple[str, ...] = KINDS
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if not self.kinds or unknown:
            raise ValueError(f"synthetic anomaly kinds must be among {', '.join(KINDS)}, got {list(self.kinds)}")

    def apply(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomalous images, masks (N, 1, H, W) of 0/1): :meth:`make` without donors or regions."""
        batch = self.make(images)
        return batch.images, batch.masks

    def make(self, images: torch.Tensor, donors: Sequence[torch.Tensor | None] | None = None,
             regions: Sequence[torch.Tensor | None] | None = None) -> SyntheticBatch:
        """Each image altered by its own draws (see the module docstring), whatever the other images are.
        ``donors``: per image, a pool (D, C, H, W) of other defect-free images of its category (the ``patch``
        kind takes one of them), or None; ``regions``: per image, a (H, W) boolean object region outside
        which nothing changes, or None."""
        x = images.detach().float().cpu().numpy()
        n, _, height, width = x.shape
        out, masks, kinds = x.copy(), np.zeros((n, 1, height, width), dtype=np.float32), []
        for i in range(n):
            rng = np.random.default_rng((self.seed, image_key(x[i])))
            pool = None if donors is None or donors[i] is None else donors[i].detach().float().cpu().numpy()
            inside = None if regions is None or regions[i] is None else np.asarray(regions[i], dtype=bool)
            for attempt in range(2 * SELF_TEXTURE_ATTEMPTS):  # redrawn (same generator) until a pixel changes
                kind = self.kinds[int(rng.integers(len(self.kinds)))]
                stain = attempt >= SELF_TEXTURE_ATTEMPTS  # a uniform image has no texture of its own to give
                out[i] = _draw(x[i], kind, stain, rng, pool)
                if inside is not None:
                    out[i] = np.where(inside[None], out[i], x[i])
                masks[i, 0] = (out[i] != x[i]).any(axis=0)
                if masks[i].any():
                    kinds.append("stain" if stain else kind)
                    break
            else:
                raise RuntimeError(f"no synthetic anomaly changed image {i} of the set")
        return SyntheticBatch(torch.from_numpy(out).to(images.dtype), torch.from_numpy(masks), kinds)


def _draw(x: np.ndarray, kind: str, stain: bool, rng: np.random.Generator, pool: np.ndarray | None) -> np.ndarray:
    """One attempt at an anomaly of ``kind`` on image ``x`` (C, H, W)."""
    _, height, width = x.shape
    if kind == "perlin" or stain:
        shift = (int(rng.integers(height)), int(rng.integers(width)))
        source = np.roll(x[:, ::-1, ::-1], shift, axis=(1, 2))
        if stain:  # the far end of the range from each pixel: differs from it everywhere
            source = np.where(x > 0, -1.0, 1.0).astype(np.float32)
        region = perlin_region(height, width, rng)[None]
        beta = rng.uniform(0.0, 0.8)
        return np.where(region, (1 - beta) * source + beta * x, x).astype(np.float32)
    if kind == "paste":
        out = x.copy()
        ty, tx, sy, sx = pasted_region(height, width, rng)
        out[:, ty, tx] = x[:, sy, sx]
        return out
    donor = x if pool is None or not len(pool) else pool[int(rng.integers(len(pool)))]
    return LOCAL_KINDS[kind](x, rng, donor)


def image_key(image: np.ndarray) -> int:
    """A 63-bit key of an image's pixels (float32), the part of its generator's seed that is the image's own."""
    digest = hashlib.blake2b(np.ascontiguousarray(image, dtype=np.float32).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


SYNTHETIC = "synthetic"  # the defect type of a synthetic validation image: synthetic:KIND


def synthetic_sample(source, kind: str, seed: int, kinds: Sequence[str]):
    """The :class:`ddad.data.dataset.Sample` of a synthetic anomaly made on ``source``: named apart from it
    (caches key images by name: the file, then how it was altered), its defect type ``synthetic:KIND``."""
    digest = hashlib.blake2b("+".join(kinds).encode(), digest_size=4).hexdigest()
    return replace(source, image=source.image.with_name(f"{source.image.name}#synthetic-{digest}-seed{seed}"),
                   label=1, defect_type=f"{SYNTHETIC}:{kind}", mask=None)


def synthetic_origin(sample) -> tuple[str, int] | None:
    """(kind, seed) of a sample made by :func:`synthetic_sample`; None for a real image."""
    kind_part = sample.defect_type.partition(":")
    if kind_part[0] != SYNTHETIC:
        return None
    return kind_part[2], int(sample.image.name.rpartition("-seed")[2])
