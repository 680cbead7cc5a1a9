"""Reading images and masks from disk into tensors, with errors that name the file.

Images of any mode (L, RGB, RGBA, palette, 16-bit) become float tensors in [-1, 1] with 1 or 3
channels, resized with antialiased bilinear interpolation. Masks are resized with nearest-neighbour
interpolation and binarised (never bilinear: that would invent soft edges and move the boundary).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# Decoding and resizing are torch-free, shared with the exported models' runtime (one implementation)
from ddad_infer.images import (IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, DatasetError, is_image_file, load_image,  # noqa: F401
                               max_image_pixels, open_image, own_size_check, unit_array)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def image_size_of(path: Path) -> tuple[int, int]:
    """(height, width) of an image file without decoding its pixels."""
    try:
        with own_size_check():
            im = Image.open(path)
        with im:
            return im.height, im.width
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot decode image file {path}: {exc}") from None


def is_grey(path: Path) -> bool:
    """Whether the image holds one grey level per pixel: a single-band mode, or colour bands that are equal
    everywhere (grey photos saved as RGB)."""
    im = open_image(path, 256)
    if len(im.getbands()) - ("A" in im.getbands()) == 1:
        return True
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def read_image(path: Path, channels: int, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Decode ``path`` to a (channels, H, W) float tensor in [-1, 1], resized to ``size`` if given
    (:func:`ddad_infer.images.load_image`)."""
    return torch.from_numpy(load_image(path, channels, size))


def read_mask(path: Path, size: int | tuple[int, int] | None = None, threshold: float = 0.5) -> torch.Tensor:
    """Decode a mask to a (1, H, W) float tensor of 0/1: pixels above ``threshold`` (of full range)
    are defect; resized with nearest-neighbour *after* binarising, so no soft edge is created."""
    arr = unit_array(open_image(Path(path)), path)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    binary = torch.from_numpy((arr > threshold).astype(np.float32))[None]
    if size is not None:
        hw = [size, size] if isinstance(size, int) else list(size)
        binary = TF.resize(binary, hw, interpolation=InterpolationMode.NEAREST_EXACT)
    return binary
