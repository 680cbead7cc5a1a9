"""Synthetic anomalies on defect-free images, for choosing thresholds and settings where no real defects are
at hand (the recipe of DRAEM, Zavrtanik et al. 2021, and CutPaste's pasted patches, Li et al. 2021):

- ``perlin``: a Perlin-noise region (noise of a random scale 2^0..2^5 cells per side, thresholded at 0.5)
  filled with a texture blended in: x' = (1 - M) x + M ((1 - b) s + b x), b ~ U(0, 0.8) (DRAEM, Eq. 1;
  the texture s is the image itself turned by 180 degrees and shifted at random, instead of DTD, which ddad
  does not download);
- ``paste``: a rectangle of the image pasted at another random place (CutPaste).

An image's anomaly depends only on the seed and the image itself: its draws come from
``numpy.random.default_rng((seed, key))`` with ``key`` a hash of its pixels, and its texture from itself, so
the same image gets the same anomaly alone, in any subset of its set and in any order. An image whose own
texture cannot change it (a uniform tile) gets, after a few draws, a Perlin-shaped stain of the far end of the
value range instead. The returned mask is exactly the set of changed pixels.
No maintained pip package offers these without a deep-learning framework of its own, so they are here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("perlin", "paste")
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
        """(anomalous images, masks (N, 1, H, W) of 0/1): each image altered by its own draws (see the
        module docstring), whatever the other images are."""
        x = images.detach().float().cpu().numpy()
        n, _, height, width = x.shape
        out, masks = x.copy(), np.zeros((n, 1, height, width), dtype=np.float32)
        for i in range(n):
            rng = np.random.default_rng((self.seed, image_key(x[i])))
            for attempt in range(2 * SELF_TEXTURE_ATTEMPTS):  # redrawn (same generator) until a pixel changes
                kind = self.kinds[int(rng.integers(len(self.kinds)))]
                stain = attempt >= SELF_TEXTURE_ATTEMPTS  # a uniform image has no texture of its own to give
                out[i] = x[i]
                if kind == "perlin" or stain:
                    shift = (int(rng.integers(height)), int(rng.integers(width)))
                    source = np.roll(x[i][:, ::-1, ::-1], shift, axis=(1, 2))
                    if stain:  # the far end of the range from each pixel: differs from it everywhere
                        source = np.where(x[i] > 0, -1.0, 1.0).astype(np.float32)
                    region = perlin_region(height, width, rng)[None]
                    beta = rng.uniform(0.0, 0.8)
                    out[i] = np.where(region, (1 - beta) * source + beta * x[i], x[i])
                else:
                    ty, tx, sy, sx = pasted_region(height, width, rng)
                    out[i][:, ty, tx] = x[i][:, sy, sx]
                masks[i, 0] = (out[i] != x[i]).any(axis=0)
                if masks[i].any():
                    break
            else:
                raise RuntimeError(f"no synthetic anomaly changed image {i} of the set")
        return torch.from_numpy(out).to(images.dtype), torch.from_numpy(masks)


def image_key(image: np.ndarray) -> int:
    """A 63-bit key of an image's pixels (float32), the part of its generator's seed that is the image's own."""
    digest = hashlib.blake2b(np.ascontiguousarray(image, dtype=np.float32).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
