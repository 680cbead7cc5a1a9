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


def colour_range(maps: torch.Tensor) -> tuple[float, float]:
    """The heatmaps' colour scale: the median map value is "cold", the 99.9th percentile "hot". ``ddad test``
    stores its range with the threshold, and ``ddad predict`` uses that one, so both colour alike."""
    vmin, vmax = (float(q) for q in np.quantile(maps.detach().float().cpu().numpy(), [0.5, 0.999]))
    return vmin, max(vmax, vmin + 1e-12)


def colour_bar_labels(width: int, vmin: float, vmax: float, threshold: float | None = None
                      ) -> list[tuple[str, int, int]]:
    """(text, x, row) of the colour bar's labels: the range's ends on the first row at the bar's ends, the
    word "threshold" centred under its mark, on the first row where it clears the end labels, else on the
    second (so labels never overlap, whatever the threshold's place)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    low, high = f"{vmin:.3g}", f"{vmax:.3g}"
    high_x = int(width - draw.textlength(high))
    labels = [(low, 0, 0), (high, high_x, 0)]
    if threshold is not None and vmin < threshold < vmax:
        mark = (threshold - vmin) / (vmax - vmin) * (width - 1)
        w = draw.textlength("threshold")
        x = int(round(min(max(mark - w / 2, 0), width - w)))
        clear = x >= draw.textlength(low) + 4 and x + w <= high_x - 4
        labels.append(("threshold", x, 0 if clear else 1))
    return labels


def colour_bar(width: int, vmin: float, vmax: float, threshold: float | None = None) -> Image.Image:
    """A horizontal scale of the heatmap colours from ``vmin`` to ``vmax``, the threshold marked."""
    bar_h, text_h = 10, 14
    labels = colour_bar_labels(width, vmin, vmax, threshold)
    rows = 1 + max(row for _, _, row in labels)
    ramp = colormap(np.linspace(0.0, 1.0, width))[None].repeat(bar_h, axis=0)
    canvas = Image.new("RGB", (width, bar_h + rows * text_h), (255, 255, 255))
    canvas.paste(Image.fromarray((ramp * 255).round().astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for text, x, row in labels:
        draw.text((x, bar_h + 1 + row * text_h), text, fill=(0, 0, 0))
    if threshold is not None and vmin < threshold < vmax:
        x = int(round((threshold - vmin) / (vmax - vmin) * (width - 1)))
        draw.line([(x, 0), (x, bar_h)], fill=(0, 0, 0), width=2)
    return canvas


def panel(
    image: torch.Tensor,
    reconstruction: torch.Tensor | None,
    amap: torch.Tensor,
    mask: torch.Tensor | None,
    title: str | None,
    vmin: float,
    vmax: float,
    tile: int = 192,
    threshold: float | None = None,
) -> Image.Image:
    """One row: input | reconstruction (for methods that make one) | heatmap overlay with its colour scale |
    ground truth (if any), under an optional title. Tiles are square: the images are the model's input."""
    rgb = to_rgb(image)
    tiles = [("input", rgb)] + ([] if reconstruction is None else [("reconstruction", to_rgb(reconstruction))])
    heat_index = len(tiles)
    tiles.append(("anomaly map", heat_overlay(rgb, amap.detach().float().cpu().numpy()[0], vmin, vmax)))
    if mask is not None:
        m = mask.detach().float().cpu().numpy()[0]
        tiles.append(("ground truth", np.repeat(m[..., None], 3, axis=2)))
    header = 34 if title else 18
    scale = colour_bar(tile, vmin, vmax, threshold)
    canvas = Image.new("RGB", (len(tiles) * (tile + 4) + 4, tile + header + 4 + scale.height + 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0))
    for i, (name, arr) in enumerate(tiles):
        x = 4 + i * (tile + 4)
        draw.text((x, header - 16), name, fill=(60, 60, 60))
        canvas.paste(_tile(arr, tile), (x, header))
    canvas.paste(scale, (4 + heat_index * (tile + 4), header + tile + 2))
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))
