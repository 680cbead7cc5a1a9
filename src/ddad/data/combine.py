"""Several datasets of different layouts as one MVTec-layout root, so one model can train on all of them
(``ddad combine``; issue 28, wall 3). Nothing is copied: the root holds symbolic links.

    OUT/<category>/train/good/<parent>_<file>                every defect-free training image
    OUT/<category>/test/<defect type>/<parent>_<file>        every test image, good ones under test/good
    OUT/<category>/ground_truth/<defect type>/<parent>_<stem>_mask<ext>   each test defect's mask

A source is ``[NAME=]FORMAT:ROOT[:CATEGORY]``: a format of :data:`ddad.data.formats.FORMATS` with a root,
and for formats whose root holds categories, one of them, a,b,c, or ``all`` (the default); each keeps its
name. A source of a single-category format (mtd, kolektorsdd) is named NAME, else after its root folder.
Each source is split as ddad splits it (``--data-seed``, the format's train ratio) with no validation share:
the combined run holds out its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .dataset import Sample
from .formats import CATEGORY_FORMATS, FORMATS, DataConfig, build_index
from .io import DatasetError


@dataclass(frozen=True)
class Source:
    dataset: str
    root: Path
    category: str = ""
    name: str = ""  # the category name in the combined root (single-category formats)

    @classmethod
    def parse(cls, spec: str) -> "Source":
        name, _, rest = spec.rpartition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
        dataset, sep, place = rest.partition(":")
        if not sep or dataset not in FORMATS or dataset == "folder":
            raise DatasetError(f"source {spec!r}: write [NAME=]FORMAT:ROOT[:CATEGORY] with a format of "
                               f"{', '.join(sorted(f for f in FORMATS if f != 'folder'))}")
        root, _, category = place.partition(":") if dataset in CATEGORY_FORMATS else (place, "", "")
        if not Path(root).is_dir():
            raise DatasetError(f"source {spec!r}: no such folder {root}")
        return cls(dataset, Path(root), category or ("all" if dataset in CATEGORY_FORMATS else ""), name)

    def config(self, seed: int) -> DataConfig:
        return DataConfig(dataset=self.dataset, root=str(self.root), category=self.category, val_ratio=0.0,
                          seed=seed)

    def category_of(self, sample: Sample) -> str:
        return sample.category or self.name or self.root.resolve().name


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.resolve() != src.resolve():
            raise DatasetError(f"{dst} exists and points elsewhere than {src}: choose an empty output folder")
        return
    dst.symlink_to(src.resolve())


def combine(sources: Sequence[Source], out: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Link every source's images into ``out`` (:mod:`module docstring <ddad.data.combine>`); returns, per
    category, its counts of train, test and mask files. Two sources giving one category name is an error."""
    out = Path(out)
    counts: dict[str, dict[str, int]] = {}
    owner: dict[str, str] = {}
    for source in sources:
        index = build_index(source.config(seed))
        for sample in index.train + index.test:
            category = source.category_of(sample)
            if owner.setdefault(category, str(source.root)) != str(source.root):
                raise DatasetError(f"category {category!r} comes from both {owner[category]} and {source.root}: "
                                   f"name one with NAME=")
        for sample in index.train:
            category = source.category_of(sample)
            _link(sample.image, out / category / "train" / "good" / f"{sample.image.parent.name}_{sample.image.name}")
            counts.setdefault(category, {"train": 0, "test": 0, "masks": 0})["train"] += 1
        for sample in index.test:
            category = source.category_of(sample)
            stem = f"{sample.image.parent.name}_{sample.image.stem}"
            _link(sample.image, out / category / "test" / sample.defect_type / f"{stem}{sample.image.suffix}")
            counts.setdefault(category, {"train": 0, "test": 0, "masks": 0})["test"] += 1
            if sample.mask is not None:
                _link(sample.mask, out / category / "ground_truth" / sample.defect_type /
                      f"{stem}_mask{sample.mask.suffix}")
                counts[category]["masks"] += 1
    return counts
