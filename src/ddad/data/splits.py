"""The image sets the commands work on, as tensors: training images, the test split, calibration images,
and the files a user points ``predict`` at. Unreadable files stop with an error naming them, or, with
``skip_bad_files``, are skipped and reported.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .dataset import DatasetIndex, ImageSet, Sample

if TYPE_CHECKING:
    from .anomalies import SyntheticAnomalies
from .formats import DataConfig, build_index, is_mask_file
from .io import DatasetError, is_image_file

Log = Callable[[str], None]


def report_skipped(skipped: list[tuple[Sample, str]], split: str, log: Log | None = None) -> None:
    """Warn about (and ``log``) files skipped by ``skip_bad_files``."""
    if not skipped:
        return
    print(f"warning: skipped {len(skipped)} unreadable {split} file(s) (skip_bad_files):")
    for _, reason in skipped:
        print(f"  {reason}")
    if log is not None:
        log(f"skipped {len(skipped)} unreadable {split} file(s): " + "; ".join(r for _, r in skipped))


def check_images(samples: Sequence[Sample], data: DataConfig, split: str, progress: bool = True,
                 log: Log | None = None) -> list[tuple[Sample, str]]:
    """Decode every image (and mask) of ``samples`` once. Unreadable ones are an error that lists them,
    or, with ``skip_bad_files``, a warning (they are left out of that split wherever it is used)."""
    images = ImageSet(samples, data.image_size, data.channels, cache=False)
    bad = []
    for i, sample in enumerate(tqdm(samples, desc=f"checking {split} images", unit="img", leave=False,
                                    disable=not progress)):
        try:
            images.load(i)
        except DatasetError as exc:
            bad.append((sample, str(exc)))
    if bad and not data.skip_bad_files:
        listed = "\n  ".join(reason for _, reason in bad[:10])
        more = f"\n  and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DatasetError(f"{len(bad)} of the {len(samples)} {split} images cannot be read:\n  {listed}{more}\n"
                           f"Fix or remove them, or pass --skip-bad-files to leave them out")
    report_skipped(bad, split, log)
    return bad


def load_train_images(data: DataConfig, index: DatasetIndex | None = None, progress: bool = True,
                      log: Log | None = None, uint8: bool = False) -> torch.Tensor:
    """The defect-free training images as one (N, C, H, W) tensor (float in [-1, 1], or uint8 0..255)."""
    index = index or build_index(data)
    train_set = ImageSet(index.train, data.image_size, data.channels)
    if data.skip_bad_files:
        report_skipped(train_set.drop_unreadable(), "training", log)
    return train_set.stack(progress=progress, uint8=uint8)


@dataclass
class TestSplit:
    """A dataset's test images as tensors, in index order."""

    samples: list[Sample]
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    masks: torch.Tensor  # (N, 1, H, W) of 0/1
    labels: np.ndarray  # (N,)
    has_masks: bool
    name: str

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(s.category for s in self.samples))

    def subset(self, part: slice) -> "TestSplit":
        """The images ``part`` of the split (e.g. one rank's share)."""
        return TestSplit(self.samples[part], self.images[part], self.masks[part], self.labels[part],
                         self.has_masks, self.name)


def load_test_split(data: DataConfig, progress: bool = True, log: Log | None = None) -> TestSplit:
    index = build_index(data)
    if not index.test:
        raise DatasetError(f"{index.name} has no test images")
    dataset = ImageSet(index.test, data.image_size, data.channels, cache=True)
    if data.skip_bad_files:
        report_skipped(dataset.drop_unreadable(), "test", log)
    items = [dataset[i] for i in tqdm(range(len(dataset)), desc="loading test images", unit="img",
                                      disable=not progress, leave=False)]
    return TestSplit(
        samples=list(dataset.samples),
        images=torch.stack([it["image"] for it in items]),
        masks=torch.stack([it["mask"] for it in items]),
        labels=np.array([it["label"] for it in items]),
        has_masks=index.has_masks,
        name=index.name,
    )


def readable_batches(samples: Sequence[Sample], data: DataConfig, batch_size: int, progress: bool = False,
                     desc: str = "images"):
    """Yield (images (B, C, H, W), their samples) for ``samples`` in order, ``batch_size`` at a time, read at the
    data's size; an unreadable file is skipped with ``data.skip_bad_files``, else its error is raised."""
    dataset = ImageSet(tuple(samples), data.image_size, data.channels, cache=False)
    images: list[torch.Tensor] = []
    kept: list[Sample] = []
    for i in tqdm(range(len(dataset)), desc=desc, unit="img", disable=not progress, leave=False):
        try:
            images.append(dataset[i]["image"])
            kept.append(dataset.samples[i])
        except DatasetError:
            if not data.skip_bad_files:
                raise
        if images and (len(images) == batch_size or i == len(dataset) - 1):
            yield torch.stack(images), kept
            images, kept = [], []


def calibration_images(data: DataConfig, count: int, seed: int, held_out: bool = False) -> torch.Tensor:
    """Up to ``count`` defect-free training images in a seeded order: the images a score scale is
    calibrated on. ``held_out``: the defect-free validation images instead, for a score whose reference holds
    the training images themselves (a memory bank: their distances to it are near 0, no scale)."""
    return calibration_set(data, count, seed, held_out)[0]


def calibration_set(data: DataConfig, count: int, seed: int, held_out: bool = False
                    ) -> tuple[torch.Tensor, list[str]]:
    """:func:`calibration_images` and the category of each."""
    index = build_index(data)
    pool = [s for s in index.val if s.label == 0] if held_out else list(index.train)
    if not pool and held_out:
        raise DatasetError(f"this score is calibrated on held-out defect-free images (its memory bank holds the "
                           f"training images), and {index.name} holds none out: set data.val_ratio above 0")
    if not pool:
        raise DatasetError(f"calibrated scoring needs defect-free training images, and {index.name} has none; "
                           "set detect.scoring.normalization to 'image'")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    dataset = ImageSet(tuple(pool[i] for i in order), data.image_size, data.channels)
    picked, categories = [], []
    for i in range(len(dataset)):
        if len(picked) == count:
            break
        try:
            picked.append(dataset[i]["image"])
            categories.append(dataset.samples[i].category)
        except DatasetError:
            if not data.skip_bad_files:
                raise
    if not picked:
        raise DatasetError(f"no readable training image in {index.name} to calibrate scoring with")
    return torch.stack(picked), categories


@dataclass
class Inputs:
    """What ``ddad predict`` was given: the image ``files`` in a stable order, each one's ``names`` (its path
    relative to the folder given, prefixed by that folder's name when several paths were given; a file given
    directly: its name), and the files in given folders that are not images (``ignored``)."""

    files: list[Path]
    names: dict[Path, str]
    ignored: list[Path]


def collect_inputs(paths: Sequence[Path | str], exclude: Sequence[str] = (), dataset: str | None = None) -> Inputs:
    """Files as given, and image files inside given folders (recursively), in a stable order; inside folders
    leaving out files whose name or path matches a glob of ``exclude`` and the masks of format ``dataset``."""
    paths = list(map(Path, paths))
    found: list[Path] = []
    names: dict[Path, str] = {}
    ignored: list[Path] = []
    for p in paths:
        if p.is_dir():
            for q in sorted(q for q in p.rglob("*") if q.is_file() and not _excluded(q, p, exclude, dataset)):
                if not is_image_file(q):
                    ignored.append(q)
                    continue
                found.append(q)
                relative = q.relative_to(p).as_posix()
                names[q] = f"{p.resolve().name}/{relative}" if len(paths) > 1 else relative
        elif p.is_file():
            found.append(p)
            names[p] = p.name
        else:
            raise DatasetError(f"no such file or folder: {p}")
    if not found:
        raise DatasetError(f"no images found in {', '.join(map(str, paths))}"
                           + (f" (excluding {', '.join(exclude)})" if exclude else "")
                           + (f"; not images: {', '.join(q.name for q in ignored[:5])}" if ignored else ""))
    return Inputs(found, names, ignored)


def collect_images(paths: Sequence[Path | str], exclude: Sequence[str] = (), dataset: str | None = None
                   ) -> list[Path]:
    """:func:`collect_inputs`' image files."""
    return collect_inputs(paths, exclude, dataset).files


def _excluded(path: Path, folder: Path, patterns: Sequence[str], dataset: str | None) -> bool:
    relative = path.relative_to(folder).as_posix()
    if any(fnmatch.fnmatch(path.name, g) or fnmatch.fnmatch(relative, g) for g in patterns):
        return True
    return dataset is not None and is_mask_file(path, dataset)


DONORS = 8  # training images per category that ``patch`` anomalies take their patches from


def donor_pools(data: DataConfig, index: DatasetIndex, seed: int) -> dict[str, torch.Tensor]:
    """Per category, up to DONORS of its readable training images in a seeded order (the ``patch`` kind's
    sources: defect-free images of the category that are not the validation images themselves)."""
    pools: dict[str, torch.Tensor] = {}
    for category in dict.fromkeys(s.category for s in index.train):
        samples = [s for s in index.train if s.category == category]
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
        dataset = ImageSet(tuple(samples[i] for i in order[:2 * DONORS]), data.image_size, data.channels)
        picked = []
        for i in range(len(dataset)):
            try:
                picked.append(dataset[i]["image"])
            except DatasetError:
                continue
            if len(picked) == DONORS:
                break
        if picked:
            pools[category] = torch.stack(picked)
    return pools


def enough_seeds(seeds: Sequence[int], good_images: int, min_defects: int) -> tuple[int, ...]:
    """``seeds``, then the seeds after their largest, until one defect per good image and seed makes at least
    ``min_defects`` defects."""
    needed = -(-min_defects // good_images) if good_images else 0  # ceil
    return tuple(seeds) + tuple(range(max(seeds) + 1, max(seeds) + 1 + needed - len(seeds)))


def load_validation_split(data: DataConfig, synthetic: "SyntheticAnomalies | None" = None, progress: bool = True,
                          log: Log | None = None, seeds: Sequence[int] | None = None, min_defects: int = 0
                          ) -> TestSplit | None:
    """The validation split: the held-out defect-free images (``val_ratio``) and the user's validation
    defects (``val_abnormal_dir``); without real defects, one synthetic anomaly on a copy of each good image
    per seed of ``seeds`` (default: ``synthetic.seed`` alone), its kind drawn from ``synthetic.kinds``
    (default :class:`SyntheticAnomalies`: every kind), patches taken from the category's training images.
    ``seeds`` are extended with the seeds after their largest until the synthetic defects number at least
    ``min_defects`` (a few held-out images still give every kind several defects). None when the run holds
    out no images."""
    from .anomalies import SyntheticAnomalies, synthetic_sample

    index = build_index(data)
    if not any(s.label == 0 for s in index.val):
        return None
    dataset = ImageSet(index.val, data.image_size, data.channels)
    if data.skip_bad_files:
        report_skipped(dataset.drop_unreadable(), "validation", log)
    items = [dataset[i] for i in tqdm(range(len(dataset)), desc="loading validation images", unit="img",
                                      disable=not progress, leave=False)]
    samples = list(dataset.samples)
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    labels = np.array([it["label"] for it in items])
    has_masks = all(s.mask is not None for s in samples if s.label == 1)
    name = f"{index.name} (validation)"
    if not labels.any():
        synthetic = synthetic or SyntheticAnomalies()
        good = [s for s, label in zip(samples, labels) if label == 0]
        pools = donor_pools(data, index, synthetic.seed) if "patch" in synthetic.kinds else {}
        donors = [pools.get(s.category) for s in good]
        fakes, fake_masks = [], []
        for seed in enough_seeds((synthetic.seed,) if seeds is None else seeds, len(good), min_defects):
            drawn = SyntheticAnomalies(synthetic.kinds, seed).make(images[labels == 0], donors)
            # named apart from their sources (caches key images by name): the file, then how it was altered
            samples += [synthetic_sample(s, kind, seed, synthetic.kinds) for s, kind in zip(good, drawn.kinds)]
            fakes.append(drawn.images)
            fake_masks.append(drawn.masks)
        images, masks = torch.cat([images, *fakes]), torch.cat([masks, *fake_masks])
        labels = np.concatenate([labels, np.ones(sum(len(f) for f in fakes), dtype=labels.dtype)])
        has_masks, name = True, f"{index.name} (validation, synthetic defects)"
    return TestSplit(samples=samples, images=images, masks=masks, labels=labels, has_masks=has_masks, name=name)
