"""Image files to arrays, without torch: decoding (any PIL mode, a pixel cap with JPEG draft decoding) and the
antialiased bilinear resize. ``ddad`` reads every image through :func:`load_image` too, so an exported model
and the run see the same input to the last bit: DDAD's noise is seeded by a hash of it (Alg. 1,
:func:`ddad_infer.noise.image_seed`), and a resize that differs by one rounding would draw other noise.

The resize is PIL's triangle filter on float planes (support scaled by the reduction factor when shrinking,
so every input pixel counts; torchvision's antialiased bilinear follows it to about 1e-5): one C loop with
no kernel chosen by the CPU at run time, so one machine architecture gives the same bits everywhere, where
torch's resize kernels differ by the CPU's vector width.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Decoded pixels per image at most (a 12000 x 12000 RGB image takes 4.7 GB as float32 arrays); a larger
# JPEG is reduced by 1/2 to 1/8 while decoding where that brings it under, anything else is refused.
# Override with the environment variable DDAD_MAX_IMAGE_PIXELS.
MAX_IMAGE_PIXELS = 100_000_000
_PIL_LIMIT = threading.Lock()
LUMA = (0.299, 0.587, 0.114)
# Names how images become arrays; caches of results computed from them carry it in their keys.
READER = "pil-bilinear-float/1"  # ITU-R 601-2, the weights of PIL's convert("L")


class DatasetError(ValueError):
    """An image file (or a dataset on disk) is not what it promises; the message names the path."""


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def max_image_pixels() -> int:
    return int(os.environ.get("DDAD_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS))


@contextlib.contextmanager
def own_size_check():
    """Open files without PIL's decompression-bomb error: :func:`open_image` applies its own cap, naming the file."""
    with _PIL_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def open_image(path, size: int | tuple[int, int] | None = None, name: str | None = None,
               formats: tuple[str, ...] | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` (a file, or a binary stream such as an upload, called ``name`` in errors; palette
    images to RGB or RGBA), the format found from the content (``formats``: the PIL formats accepted, None:
    any). Above :func:`max_image_pixels`, a JPEG is decoded at a reduced scale still at least ``size``; any
    other image is refused with an error naming it (``max_pixels``: another cap)."""
    cap = max_pixels or max_image_pixels()
    label = name or path
    try:
        with own_size_check():
            im = Image.open(path, formats=formats)
        with im:
            w, h = im.size
            if w * h > cap and im.format == "JPEG" and size is not None:
                hw = (size, size) if isinstance(size, int) else tuple(size)
                im.draft(im.mode, (hw[1], hw[0]))  # DCT scaling: the smallest of 1/2 .. 1/8 still >= size
            if im.size[0] * im.size[1] > cap:
                raise DatasetError(
                    f"image file {label} is {w} x {h} = {w * h / 1e6:.0f} megapixels, more than the {cap / 1e6:.0f} "
                    f"that ddad decodes (it would take {w * h * len(im.getbands()) * 4 / 2**30:.1f} GiB as floats). "
                    f"Downscale it, or raise the limit with DDAD_MAX_IMAGE_PIXELS")
            im.load()
            return im.copy() if im.mode != "P" else im.convert("RGBA" if "transparency" in im.info else "RGB")
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, DatasetError):
            raise
        reason = (f"its content is not an image of a format read here ({', '.join(formats or ('any PIL reads',))})"
                  if isinstance(exc, UnidentifiedImageError) else exc)
        raise DatasetError(f"cannot decode image file {label}: {reason}") from None


def unit_array(im: Image.Image, path: Path | str = "") -> np.ndarray:
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


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, height, width): antialiased bilinear (PIL's triangle filter on 32-bit float
    planes, width then height, double accumulation)."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    if image.shape[1:] == (height, width):
        return image
    return np.stack([np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.BILINEAR))
                     for plane in image])


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(c, H, W) -> (channels, H, W): colour to grey by :data:`LUMA`, grey repeated to colour."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if channels == 1 and image.shape[0] == 3:
        r, g, b = (image[i] * np.float32(w) for i, w in enumerate(LUMA))
        return ((r + g) + b)[None]
    if channels == 3 and image.shape[0] == 1:
        return np.repeat(image, 3, axis=0)
    return image


def load_image(path, channels: int, size: int | tuple[int, int] | None = None, name: str | None = None,
               formats: tuple[str, ...] | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode ``path`` (a file, or a binary stream called ``name``; see :func:`open_image`) to a
    (channels, H, W) float32 array in [-1, 1], resized to ``size`` if given."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    stream = hasattr(path, "read")
    arr = unit_array(open_image(path if stream else Path(path), size, name, formats, max_pixels), name or path)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    image = to_channels(np.ascontiguousarray(arr.transpose(2, 0, 1)), channels)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        image = resize_bilinear(image, h, w)
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0) * np.float32(2.0) - np.float32(1.0))
