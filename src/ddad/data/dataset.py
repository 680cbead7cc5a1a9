"""One dataset interface for every on-disk format: an index of samples, and tensors on demand.

A format reader (``ddad.data.formats``) turns a root folder into a :class:`DatasetIndex`: the
defect-free training images and the labelled test images, each a :class:`Sample` that knows its
image path, label, defect type and mask path. :class:`ImageSet` turns samples into tensors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .io import DatasetError, image_size_of, read_image, read_mask

GOOD = 0
DEFECTIVE = 1


@dataclass(frozen=True)
class Sample:
    """One image. ``label`` is 0 (good) or 1 (defective); ``mask`` is None where none exists
    (a good image, or a dataset without pixel annotations); ``category`` is the category it belongs to
    ("" for formats without categories)."""

    image: Path
    label: int = GOOD
    defect_type: str = "good"
    mask: Path | None = None
    category: str = ""


@dataclass(frozen=True)
class DatasetIndex:
    name: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    has_masks: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)
    val: tuple[Sample, ...] = ()  # held-out defect-free images, and the user's labelled validation defects

    @property
    def categories(self) -> list[str]:
        """The categories of its samples, in order of first appearance."""
        return list(dict.fromkeys(s.category for s in self.train + self.test))

    def statistics(self) -> dict:
        """Counts per split and defect type."""
        return {
            "name": self.name,
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "test_good": sum(s.label == GOOD for s in self.test),
            "test_defective": sum(s.label == DEFECTIVE for s in self.test),
            "test_by_type": dict(sorted(Counter(s.defect_type for s in self.test).items())),
            "has_masks": self.has_masks,
        }

    def describe(self) -> str:
        st = self.statistics()
        types = ", ".join(f"{k} {v}" for k, v in st["test_by_type"].items())
        held = f" ({st['val']} held out for validation)" if st["val"] else ""
        return (f"{st['name']}: {st['train']} train images{held}; {st['test']} test images "
                f"({st['test_good']} good, {st['test_defective']} defective: {types})")


def check_mask_size(sample: Sample) -> None:
    """A mask must have its image's size (before any resizing)."""
    if sample.mask is None:
        return
    ih, iw = image_size_of(sample.image)
    mh, mw = image_size_of(sample.mask)
    if (ih, iw) != (mh, mw):
        raise DatasetError(
            f"mask {sample.mask} is {mw}x{mh} but its image {sample.image} is {iw}x{ih}"
        )


class ImageSet(Dataset):
    """Tensors for a list of samples: image in [-1, 1], mask of 0/1, label, index.

    Decoded, resized images are cached in memory (``cache=True``), so an epoch after the first
    decodes nothing."""

    def __init__(self, samples: Sequence[Sample], image_size: int, channels: int, cache: bool = True) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.channels = channels
        self.cache = cache
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index in self._cache:
            return self._cache[index]
        sample = self.samples[index]
        image = read_image(sample.image, self.channels, self.image_size)
        if sample.mask is not None:
            check_mask_size(sample)
            mask = read_mask(sample.mask, self.image_size)
        else:
            mask = torch.zeros(1, self.image_size, self.image_size)
        if self.cache:
            self._cache[index] = (image, mask)
        return image, mask

    def __getitem__(self, index: int) -> dict:
        image, mask = self.load(index)
        sample = self.samples[index]
        return {"image": image, "mask": mask, "label": sample.label, "index": index}

    def drop_unreadable(self) -> list[tuple[Sample, str]]:
        """Decode every sample; remove those that fail and return them with the reason."""
        kept, skipped = [], []
        for i, sample in enumerate(self.samples):
            try:
                self.load(i)
                kept.append(sample)
            except DatasetError as exc:
                skipped.append((sample, str(exc)))
        if skipped:
            cached = {s: self._cache[i] for i, s in enumerate(self.samples) if i in self._cache}
            self.samples = kept
            self._cache = {i: cached[s] for i, s in enumerate(kept) if s in cached}
        return skipped

    def stack(self, progress: bool = False, desc: str = "loading images", uint8: bool = False) -> torch.Tensor:
        """All images as one (N, C, H, W) tensor: float in [-1, 1], or with ``uint8`` quantised to 0..255
        (a quarter of the memory; the training engine scales such batches back to [-1, 1])."""
        from tqdm.auto import tqdm

        indices = range(len(self))
        it = tqdm(indices, desc=desc, unit="img", leave=False) if progress else indices
        if not uint8:
            return torch.stack([self.load(i)[0] for i in it])
        out = torch.empty((len(self), self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        for i in it:  # one image at a time: the float copies are never all in memory
            out[i] = ((self.load(i)[0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            self._cache.pop(i, None)
        return out
