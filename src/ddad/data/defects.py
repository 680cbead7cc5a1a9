"""The kinds of synthetic defect, each a pure function ``(image, rng, donor) -> altered image`` over one image
(C, H, W) float32 in [-1, 1], drawing only from ``rng``. :mod:`ddad.data.anomalies` chooses the kind, the
seed and the mask (exactly the changed pixels). What each imitates on a line:

- ``perlin``  a Perlin-noise region blended with a texture of the image (DRAEM, Eq. 1): stains, texture faults
- ``paste``   a rectangle of the image pasted elsewhere (CutPaste): misplaced parts
- ``patch``   a patch of another defect-free image of the category, Poisson-blended in (NSA, Schlueter et al.
              2022): natural-looking local differences, the hardest kind to tell from real variation
- ``scratch`` a thin bending polyline, 1 or 3 px wide, darker or brighter: scratches and cracks
- ``scar``    a thin rotated strip of the image pasted elsewhere (CutPaste-scar)
- ``warp``    a smooth local displacement of the pixels (an elastic push): bent or displaced parts
- ``blob``    an irregular spot of one colour, opaque or translucent: contamination, dirt
- ``colour``  a region's intensity or colour changed (gain and shift): discolouration, burns

Sizes: the localised kinds draw their extent log-uniformly from a few pixels to about a third of the image
side (:func:`extent`), so small defects are in every mix.
"""

from __future__ import annotations

import numpy as np
from scipy import fft, ndimage

F32 = np.float32
SMALLEST = 3  # pixels: the smallest defect extent drawn
LARGEST = 0.3  # of the image's shorter side
MIN_CHANGE = 0.04  # kinds that change many pixels a little keep only changes above this (2 % of the range)


def extent(height: int, width: int, rng: np.random.Generator) -> int:
    """A defect's extent in pixels, log-uniform in [SMALLEST, LARGEST * min(H, W)]."""
    largest = max(SMALLEST + 1, LARGEST * min(height, width))
    return int(round(np.exp(rng.uniform(np.log(SMALLEST), np.log(largest)))))


def _box(height: int, width: int, h: int, w: int, rng: np.random.Generator) -> tuple[slice, slice]:
    h, w = min(max(h, 1), height), min(max(w, 1), width)
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    return slice(y, y + h), slice(x, x + w)


def _significant(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` where it differs from ``x`` by at least MIN_CHANGE in some channel, else ``x``."""
    changed = (np.abs(out - x) >= MIN_CHANGE).any(axis=0, keepdims=True)
    return np.where(changed, out, x).astype(F32)


def poisson_blend(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Seamless cloning of ``source`` into ``target`` (both (C, h, w), h, w >= 3): the interior solves the
    discrete Poisson equation  lap f = lap source  with f = target on the border (Perez et al. 2003), exactly
    by the sine transform that diagonalises the Dirichlet Laplacian."""
    c, h, w = target.shape
    out = target.astype(np.float64).copy()
    s = source.astype(np.float64)
    lap = (s[:, :-2, 1:-1] + s[:, 2:, 1:-1] + s[:, 1:-1, :-2] + s[:, 1:-1, 2:] - 4 * s[:, 1:-1, 1:-1])
    rhs = lap.copy()  # known border values moved to the right-hand side
    rhs[:, 0, :] -= out[:, 0, 1:-1]
    rhs[:, -1, :] -= out[:, -1, 1:-1]
    rhs[:, :, 0] -= out[:, 1:-1, 0]
    rhs[:, :, -1] -= out[:, 1:-1, -1]
    ny, nx = h - 2, w - 2
    ly = 2 * np.cos(np.pi * np.arange(1, ny + 1) / (ny + 1)) - 2
    lx = 2 * np.cos(np.pi * np.arange(1, nx + 1) / (nx + 1)) - 2
    spectrum = fft.dstn(rhs, type=1, axes=(1, 2)) / (ly[:, None] + lx[None, :])
    out[:, 1:-1, 1:-1] = fft.idstn(spectrum, type=1, axes=(1, 2))
    return np.clip(out, -1, 1).astype(F32)


def patch(x: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> np.ndarray:
    _, height, width = x.shape
    side = max(extent(height, width, rng), 3)
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    h, w = max(3, int(side * np.sqrt(aspect))), max(3, int(side / np.sqrt(aspect)))
    ty, tx = _box(height, width, h, w, rng)
    sy, sx = _box(height, width, ty.stop - ty.start, tx.stop - tx.start, rng)
    out = x.copy()
    out[:, ty, tx] = poisson_blend(x[:, ty, tx], donor[:, sy, sx])
    return _significant(x, out)


def _polyline_mask(height: int, width: int, rng: np.random.Generator, length: int, thickness: int) -> np.ndarray:
    """Pixels within ``thickness`` / 2 of a random polyline of about ``length`` px (3 segments, bending)."""
    y, x = rng.uniform(0, height), rng.uniform(0, width)
    angle = rng.uniform(0, 2 * np.pi)
    points = []
    for _ in range(3):
        angle += rng.normal(0, 0.5)
        for _ in range(max(2, 2 * length // 3)):  # half-pixel steps
            points.append((y, x))
            y, x = y + 0.5 * np.sin(angle), x + 0.5 * np.cos(angle)
    centre = np.zeros((height, width), dtype=bool)
    for py, px in points:
        iy, ix = int(py), int(px)
        if 0 <= iy < height and 0 <= ix < width:
            centre[iy, ix] = True
    if thickness > 1:
        centre = ndimage.binary_dilation(centre, iterations=thickness // 2)
    return centre


def scratch(x: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> np.ndarray:
    _, height, width = x.shape
    length = max(2 * extent(height, width, rng), 4)  # scratches run long: up to 0.6 of the side
    line = _polyline_mask(height, width, rng, length, int(rng.integers(1, 4)))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return np.where(line[None], np.clip(x + sign * rng.uniform(0.3, 1.0), -1, 1), x).astype(F32)


def scar(x: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> np.ndarray:
    """A strip of length L (extent) and width L / 8 .. L / 3 (at least 1 px), turned by up to 45 degrees,
    taken from elsewhere in the image (nearest pixel)."""
    _, height, width = x.shape
    length = max(extent(height, width, rng), 4)
    thick = max(1.0, length * rng.uniform(1 / 8, 1 / 3))
    theta = rng.uniform(-np.pi / 4, np.pi / 4)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    sy, sx = rng.uniform(0, height), rng.uniform(0, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    along = (yy - cy) * np.sin(theta) + (xx - cx) * np.cos(theta)
    across = (yy - cy) * np.cos(theta) - (xx - cx) * np.sin(theta)
    inside = (np.abs(along) <= length / 2) & (np.abs(across) <= thick / 2)
    src_y = np.clip(np.round(sy + yy - cy), 0, height - 1).astype(int)
    src_x = np.clip(np.round(sx + xx - cx), 0, width - 1).astype(int)
    return np.where(inside[None], x[:, src_y, src_x], x).astype(F32)


def warp(x: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> np.ndarray:
    """Pixels pushed along one direction by up to a third of the radius, the push fading as a Gaussian; the
    pixels moved by at least half a pixel take their new values (a solid region, not the texture's speckle)."""
    _, height, width = x.shape
    radius = max(extent(height, width, rng), 4)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    theta = rng.uniform(0, 2 * np.pi)
    amount = rng.uniform(0.15, 0.35) * radius
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    fall = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (radius / 2) ** 2))
    coords = [yy - amount * fall * np.sin(theta), xx - amount * fall * np.cos(theta)]
    out = np.stack([ndimage.map_coordinates(ch, coords, order=1, mode="nearest") for ch in x])
    return np.where((amount * fall >= 0.5)[None], out, x).astype(F32)


def _region(height: int, width: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """An irregular region of about ``size`` px across: an ellipse whose radius is modulated by a few
    random harmonics of the angle."""
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = size / 2 * rng.uniform(0.6, 1.0), size / 2 * rng.uniform(0.6, 1.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    dy, dx = (yy - cy) / max(ry, 0.5), (xx - cx) / max(rx, 0.5)
    phi = np.arctan2(dy, dx)
    wobble = 1 + sum(rng.uniform(0, 0.25) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    region = np.hypot(dy, dx) <= wobble
    if not region.any():
        region[int(np.clip(cy, 0, height - 1)), int(np.clip(cx, 0, width - 1))] = True
    return region


def blob(x: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> np.ndarray:
    c, height, width = x.shape
    region = _region(height, width, rng, extent(height, width, rng))
    colour = rng.uniform(-1, 1, size=(c, 1, 1)).astype(F32)
    if rng.random() < 0.5:  # dirt is mostly dark
        colour = -np.abs(colour)
    opacity = rng.uniform(0.5, 1.0)
    return np.where(region[None], (1 - opacity) * x + opacity * colour, x).astype(F32)


def colour(x: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> np.ndarray:
    c, height, width = x.shape
    region = _region(height, width, rng, max(extent(height, width, rng), 2 * SMALLEST))
    gain = rng.uniform(0.6, 1.4, size=(c, 1, 1))
    shift = rng.uniform(-0.3, 0.3, size=(c, 1, 1))
    out = np.where(region[None], np.clip(x * gain + shift, -1, 1), x)
    return _significant(x, out)


# the two original kinds (DRAEM's Perlin blend, CutPaste) are in :mod:`ddad.data.anomalies`
LOCAL_KINDS = {"patch": patch, "scratch": scratch, "scar": scar, "warp": warp, "blob": blob, "colour": colour}
