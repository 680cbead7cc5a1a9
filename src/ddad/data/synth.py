"""A small synthetic anomaly-detection dataset in the MVTec layout, generated from a seed.

Two categories: ``stripes`` (a texture: oriented sinusoidal stripes whose phase varies per image)
and ``washer`` (an object: a bright ring on a dark background, its position jittering slightly).
Defective test images carry one of three defect types with an exact mask of the changed pixels:
``scratch`` (a thin line), ``spot`` (a coloured blob) and ``missing`` (part of the pattern gone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("stripes", "washer")
DEFECT_TYPES = ("scratch", "spot", "missing")


@dataclass(frozen=True)
class SynthConfig:
    size: int = 64
    train: int = 48
    test_good: int = 12
    test_defective_per_type: int = 6
    seed: int = 0
    categories: tuple[str, ...] = CATEGORIES


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return (x + 0.5) / size, (y + 0.5) / size


def _stripes(size: int, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(size)
    theta = np.deg2rad(35.0)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) * 6.0 + phase)
    base = np.array([0.62, 0.50, 0.34], dtype=np.float32)
    img = base[None, None, :] * (0.75 + 0.25 * wave[..., None])
    return img


def _washer(size: int, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(size)
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03, size=2)
    r = np.hypot(x - cx, y - cy)
    ring = ((r < 0.34) & (r > 0.14)).astype(np.float32)
    img = np.full((size, size, 3), 0.12, dtype=np.float32)
    metal = np.array([0.70, 0.72, 0.76], dtype=np.float32) * (1.0 - 0.35 * r[..., None])
    return img * (1 - ring[..., None]) + metal * ring[..., None]


def _scratch(size: int, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(size)
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    angle = rng.uniform(0, np.pi)
    half = rng.uniform(0.15, 0.25)
    dx, dy = np.cos(angle), np.sin(angle)
    along = (x - cx) * dx + (y - cy) * dy
    across = np.abs(-(x - cx) * dy + (y - cy) * dx)
    return (np.abs(along) <= half) & (across <= max(1.0, size / 48) / size)


def _spot(size: int, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(size)
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    rx, ry = rng.uniform(0.05, 0.09, size=2)
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _missing_region(size: int, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(size)
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    hw, hh = rng.uniform(0.07, 0.12, size=2)
    return (np.abs(x - cx) <= hw) & (np.abs(y - cy) <= hh)


def _defect(category: str, kind: str, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    out = img.copy()
    if kind == "scratch":
        region = _scratch(size, rng)
        out[region] = np.array([0.95, 0.95, 0.90]) if category == "stripes" else np.array([0.05, 0.05, 0.05])
    elif kind == "spot":
        region = _spot(size, rng)
        out[region] = np.array([0.55, 0.12, 0.10])
    elif kind == "missing":
        region = _missing_region(size, rng)
        fill = img.reshape(-1, 3).mean(0) if category == "stripes" else np.array([0.12, 0.12, 0.12])
        out[region] = fill
    else:  # pragma: no cover - guarded by DEFECT_TYPES
        raise ValueError(kind)
    # The mask is exactly the set of pixels the defect changed (visibly).
    changed = np.abs(out - img).max(axis=2) > 1.5 / 255
    return out, changed


def _render(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if category == "stripes":
        return _stripes(size, rng)
    if category == "washer":
        return _washer(size, rng)
    raise ValueError(f"unknown synthetic category {category!r}; choose from {CATEGORIES}")


def _save(img: np.ndarray, path: Path, rng: np.random.Generator | None = None) -> None:
    if rng is not None:
        img = img + rng.normal(0.0, 0.015, size=img.shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(path)


def generate(out: Path | str, config: SynthConfig = SynthConfig()) -> list[Path]:
    """Write the dataset under ``out`` (one folder per category); returns the category folders."""
    out = Path(out)
    folders = []
    for c_index, category in enumerate(config.categories):
        rng = np.random.default_rng([config.seed, c_index])
        base = out / category
        for i in range(config.train):
            _save(_render(category, config.size, rng), base / "train" / "good" / f"{i:03d}.png", rng)
        for i in range(config.test_good):
            _save(_render(category, config.size, rng), base / "test" / "good" / f"{i:03d}.png", rng)
        for kind in DEFECT_TYPES:
            for i in range(config.test_defective_per_type):
                img, mask = _defect(category, kind, _render(category, config.size, rng), rng)
                _save(img, base / "test" / kind / f"{i:03d}.png", rng)
                mpath = base / "ground_truth" / kind / f"{i:03d}_mask.png"
                mpath.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(mpath)
        folders.append(base)
    return folders
