"""Reading images and masks from disk into tensors, with errors that name the file.

Images of any mode (L, RGB, RGBA, palette, 16-bit) become float tensors in [-1, 1] with 1 or 3
channels, resized with antialiased bilinear interpolation. Masks are resized with nearest-neighbour
interpolation and binarised (never bilinear: that would invent soft edges and move the boundary).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset on disk is not what its format promises (message names the path)."""


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


# Decoded pixels per image at most (a 12000 x 12000 RGB image takes 4.7 GB as float32 arrays); a larger
# JPEG is reduced by 1/2 to 1/8 while decoding where that brings it under, anything else is refused.
# Override with the environment variable DDAD_MAX_IMAGE_PIXELS.
MAX_IMAGE_PIXELS = 100_000_000
_PIL_LIMIT = threading.Lock()


def max_image_pixels() -> int:
    return int(os.environ.get("DDAD_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS))


@contextlib.contextmanager
def _own_size_check():
    """Open files without PIL's decompression-bomb error: :func:`_open` applies its own cap, naming the file."""
    with _PIL_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(path: Path, size: int | tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` (palette images to RGB or RGBA). Above :func:`max_image_pixels`, a JPEG is decoded at
    a reduced scale still at least ``size``; any other image is refused with an error naming it."""
    cap = max_image_pixels()
    try:
        with _own_size_check():
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > cap and im.format == "JPEG" and size is not None:
                hw = (size, size) if isinstance(size, int) else tuple(size)
                im.draft(im.mode, (hw[1], hw[0]))  # DCT scaling: the smallest of 1/2 .. 1/8 still >= size
            if im.size[0] * im.size[1] > cap:
                raise DatasetError(
                    f"image file {path} is {w} x {h} = {w * h / 1e6:.0f} megapixels, more than the {cap / 1e6:.0f} "
                    f"that ddad decodes (it would take {w * h * len(im.getbands()) * 4 / 2**30:.1f} GiB as floats). "
                    f"Downscale it, or raise the limit with DDAD_MAX_IMAGE_PIXELS")
            im.load()
            return im.copy() if im.mode != "P" else im.convert("RGBA" if "transparency" in im.info else "RGB")
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"cannot decode image file {path}: {exc}") from None


def _to_unit_array(im: Image.Image, path: Path | str = "") -> np.ndarray:
    """HxW or HxWxC float32 array in [0, 1]: 8-bit and 16-bit images scaled by their full range; 32-bit
    integer and float images (TIFF modes I and F) by the smallest of the ranges [0, 1], [0, 255] and
    [0, 65535] that holds their values, anything else refused."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if finite.size != arr.size or lo < 0 or hi > 65535:
            raise DatasetError(f"image file {path} ({im.mode}, {'float' if im.mode == 'F' else 'int32'}) has values "
                               f"in [{lo:g}, {hi:g}]{'' if finite.size == arr.size else ' and non-finite ones'}: "
                               "ddad reads such images in [0, 1], [0, 255] or [0, 65535]; convert it to 8 or 16 bit")
        peak = 1.0 if im.mode == "F" and hi <= 1.0 else 255.0 if hi <= 255 else 65535.0
        return arr / peak
    if im.mode == "1":
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.float32) / 255.0


def image_size_of(path: Path) -> tuple[int, int]:
    """(height, width) of an image file without decoding its pixels."""
    try:
        with _own_size_check():
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
    im = _open(path, 256)
    if len(im.getbands()) - ("A" in im.getbands()) == 1:
        return True
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def read_image(path: Path, channels: int, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Decode ``path`` to a (channels, H, W) float tensor in [-1, 1], resized to ``size`` if given."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    arr = _to_unit_array(_open(Path(path), size), path)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if channels == 1 and tensor.shape[0] == 3:
        # ITU-R 601-2 luma, the same weights as PIL's convert("L").
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        tensor = (tensor * weights).sum(0, keepdim=True)
    elif channels == 3 and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if size is not None:
        hw = [size, size] if isinstance(size, int) else list(size)
        tensor = TF.resize(tensor, hw, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return (tensor.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def read_mask(path: Path, size: int | tuple[int, int] | None = None, threshold: float = 0.5) -> torch.Tensor:
    """Decode a mask to a (1, H, W) float tensor of 0/1: pixels above ``threshold`` (of full range)
    are defect; resized with nearest-neighbour *after* binarising, so no soft edge is created."""
    arr = _to_unit_array(_open(Path(path)), path)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    binary = torch.from_numpy((arr > threshold).astype(np.float32))[None]
    if size is not None:
        hw = [size, size] if isinstance(size, int) else list(size)
        binary = TF.resize(binary, hw, interpolation=InterpolationMode.NEAREST_EXACT)
    return binary
