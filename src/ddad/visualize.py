"""Pictures a person looks at: input, reconstruction, heatmap overlay and ground truth, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .checkpoint import atomic_write

# Anchor colours of a perceptually ordered blue -> cyan -> yellow -> red map.
_ANCHORS = np.array([
    [0.0, 0.05, 0.05, 0.35],
    [0.25, 0.10, 0.45, 0.85],
    [0.50, 0.20, 0.80, 0.75],
    [0.75, 0.95, 0.85, 0.20],
    [1.00, 0.80, 0.05, 0.05],
])


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB floats in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)], axis=-1)


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) floats in [0, 1]."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def heat_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    norm = (amap - vmin) / max(vmax - vmin, 1e-12)
    return (1 - alpha) * image + alpha * colormap(norm)


def _tile(arr: np.ndarray, size: int) -> Image.Image:
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    return img.resize((size, size), Image.NEAREST if img.width < size else Image.BILINEAR)


def panel(
    image: torch.Tensor,
    reconstruction: torch.Tensor | None,
    amap: torch.Tensor,
    mask: torch.Tensor | None,
    title: str,
    vmin: float,
    vmax: float,
    tile: int = 192,
) -> Image.Image:
    """One row: input | reconstruction (for methods that make one) | heatmap overlay | ground truth (if
    any), with a title."""
    rgb = to_rgb(image)
    tiles = [("input", rgb)] + ([] if reconstruction is None else [("reconstruction", to_rgb(reconstruction))])
    tiles.append(("anomaly map", heat_overlay(rgb, amap.detach().float().cpu().numpy()[0], vmin, vmax)))
    if mask is not None:
        m = mask.detach().float().cpu().numpy()[0]
        tiles.append(("ground truth", np.repeat(m[..., None], 3, axis=2)))
    header = 34
    canvas = Image.new("RGB", (len(tiles) * (tile + 4) + 4, tile + header + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=(0, 0, 0))
    for i, (name, arr) in enumerate(tiles):
        x = 4 + i * (tile + 4)
        draw.text((x, 18), name, fill=(60, 60, 60))
        canvas.paste(_tile(arr, tile), (x, header))
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))
