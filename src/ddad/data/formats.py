"""Readers for on-disk dataset layouts; each returns a :class:`DatasetIndex`.

mvtec (also MPDD, which uses the same layout)::

    ROOT/CATEGORY/train/good/*.png
    ROOT/CATEGORY/test/good/*.png
    ROOT/CATEGORY/test/<defect type>/*.png
    ROOT/CATEGORY/ground_truth/<defect type>/<stem>_mask.png

(png, jpg, bmp and tif accepted for images and masks.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .dataset import DEFECTIVE, GOOD, DatasetIndex, Sample
from .io import IMAGE_SUFFIXES, DatasetError, list_images


@dataclass(frozen=True)
class DataConfig:
    """Which data to read and how to present it to the model."""

    dataset: str = "mvtec"
    root: str = ""
    category: str = ""
    image_size: int = 256
    channels: int = 3
    seed: int = 0  # for formats whose split is seeded
    train_ratio: float = 0.8  # for formats whose split is a ratio of defect-free images

    def __post_init__(self) -> None:
        if self.dataset not in FORMATS:
            raise ValueError(f"unknown dataset format {self.dataset!r}; choose one of {sorted(FORMATS)}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 < self.train_ratio < 1.0:
            raise ValueError(f"train_ratio must be in (0, 1), got {self.train_ratio}")

    def to_dict(self) -> dict:
        return asdict(self)


def _categories(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_mask(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}_mask{suffix}", folder / f"{stem}{suffix}"):
            if candidate.is_file():
                return candidate
    return None


def category_dir(root: Path, category: str) -> Path:
    """``root/category``, or an error listing the categories that do exist."""
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    if not category:
        raise DatasetError(f"no category given; categories in {root}: {', '.join(_categories(root)) or '(none)'}")
    path = root / category
    if not path.is_dir():
        raise DatasetError(
            f"unknown category {category!r}: {path} does not exist. "
            f"Categories in {root}: {', '.join(_categories(root)) or '(none)'}"
        )
    return path


def read_mvtec(config: DataConfig) -> DatasetIndex:
    """MVTec AD layout (see module docstring)."""
    base = category_dir(Path(config.root), config.category)
    train_dir = base / "train" / "good"
    if not train_dir.is_dir():
        raise DatasetError(f"missing training folder {train_dir} (expected defect-free images there)")
    train = tuple(Sample(p) for p in list_images(train_dir))
    if not train:
        raise DatasetError(f"training folder {train_dir} contains no images ({', '.join(IMAGE_SUFFIXES)})")

    test_dir = base / "test"
    test: list[Sample] = []
    if test_dir.is_dir():
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = type_dir.name
            for img in list_images(type_dir):
                if defect == "good":
                    test.append(Sample(img, GOOD, "good", None))
                    continue
                mask_dir = base / "ground_truth" / defect
                mask = _find_mask(mask_dir, img.stem)
                if mask is None:
                    raise DatasetError(
                        f"defective image {img} has no mask: expected {mask_dir / (img.stem + '_mask.png')}"
                    )
                test.append(Sample(img, DEFECTIVE, defect, mask))
    return DatasetIndex(name=f"{config.dataset}/{config.category}", train=train, test=tuple(test))


FORMATS: dict[str, Callable[[DataConfig], DatasetIndex]] = {
    "mvtec": read_mvtec,
    "mpdd": read_mvtec,
}


def build_index(config: DataConfig) -> DatasetIndex:
    """Read the dataset that ``config`` names."""
    return FORMATS[config.dataset](config)
