"""Readers for on-disk dataset layouts; each returns a :class:`DatasetIndex`.

mvtec (also MPDD, which uses the same layout)::

    ROOT/CATEGORY/train/good/*.png
    ROOT/CATEGORY/test/good/*.png
    ROOT/CATEGORY/test/<defect type>/*.png
    ROOT/CATEGORY/ground_truth/<defect type>/<stem>_mask.png

(png, jpg, bmp and tif accepted for images and masks.)

visa: ``ROOT/split_csv/1cls.csv`` (columns object, split, label, image, mask; paths relative to ROOT;
labels normal / anomaly), or without it the raw layout ``ROOT/CATEGORY/Data/Images/{Normal,Anomaly}``
with ``Data/Masks/Anomaly/<stem>.png`` and a seeded split of the normal images.

mtd: ``ROOT/MT_<Type>/Imgs/NAME.jpg`` with the mask ``NAME.png`` beside it (threshold > 127);
training = a seeded ``train_ratio`` (0.8) of MT_Free, test = the rest of MT_Free + every defective image.

btad: ``ROOT/NN/train/ok``, ``ROOT/NN/test/{ok,ko}``, ``ROOT/NN/ground_truth/ko`` (a mask may differ
from its image in extension).

kolektorsdd: ``ROOT/kosNN/PartK.jpg`` + ``PartK_label.(bmp|png)``; an image is defective when its
label is non-empty; training = a seeded ``train_ratio`` of the defect-free images.

folder: ``normal_dir`` (defect-free), optional ``abnormal_dir``, optional ``mask_dir`` (masks matched
to abnormal images by stem), optional ``normal_test_dir``; without it a seeded ``1 - train_ratio`` of
the normal images is held out for testing.

Several categories: ``category`` may be a comma-separated list (``bottle,cable``) or ``all`` (every
category under the root); :func:`build_index` then gives one index over all of them, each sample knowing
its category. Formats without categories (mtd, kolektorsdd, folder) ignore ``category``.
"""

from __future__ import annotations

import csv
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


from .dataset import DEFECTIVE, GOOD, DatasetIndex, Sample
from .io import IMAGE_SUFFIXES, DatasetError, list_images, read_mask


@dataclass(frozen=True)
class DataConfig:
    """Which data to read and how to present it to the model."""

    dataset: str = "mvtec"
    root: str = field(default="", metadata={"path": True})
    category: str = ""
    image_size: int = 256
    channels: int = 3
    seed: int = 0  # for formats whose split is seeded
    train_ratio: float = 0.8  # for formats whose split is a ratio of defect-free images
    skip_bad_files: bool = False  # skip undecodable images with a warning instead of stopping
    # defect-free training images held out (seeded, per category) to choose thresholds and settings on
    val_ratio: float = 0.1
    val_abnormal_dir: str = field(default="", metadata={"path": True})  # the user's own validation defects
    val_mask_dir: str = field(default="", metadata={"path": True})  # their masks, matched by stem
    # folder format only
    normal_dir: str = field(default="", metadata={"path": True})
    abnormal_dir: str = field(default="", metadata={"path": True})
    mask_dir: str = field(default="", metadata={"path": True})
    normal_test_dir: str = field(default="", metadata={"path": True})

    def __post_init__(self) -> None:
        if self.dataset not in FORMATS:
            raise ValueError(f"unknown dataset format {self.dataset!r}; choose one of {sorted(FORMATS)}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 < self.train_ratio < 1.0:
            raise ValueError(f"train_ratio must be in (0, 1), got {self.train_ratio}")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ValueError(f"val_ratio must be in [0, 1), got {self.val_ratio}")
        if self.val_mask_dir and not self.val_abnormal_dir:
            raise ValueError("val_mask_dir needs val_abnormal_dir (the validation defects the masks belong to)")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def upgrade_stored(data: Mapping[str, Any] | None) -> dict:
        """A run's stored data section: runs written before validation splits trained on every defect-free
        training image (val_ratio 0)."""
        data = dict(data or {})
        data.setdefault("val_ratio", 0.0)
        return data

    def path_fields(self) -> dict[str, str]:
        """The settings that are paths (marked so on their fields), where set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("path") and getattr(self, f.name)}

    def absolute(self, base: Path | str | None = None) -> "DataConfig":
        """These settings with every path absolute (relative ones taken from ``base``, default the current
        directory): a run then finds its data from any working directory."""
        base = Path(base) if base is not None else Path.cwd()
        return replace(self, **{k: str((base / Path(v).expanduser()).resolve()) for k, v in self.path_fields().items()})


    def located(self, near: Path | str) -> "DataConfig":
        """Settings written with relative paths (ddad before 0.2 stored them as given): absolute from the
        current directory where they exist there, else from the nearest folder above ``near`` (the run
        directory) where they all exist; as they are when neither holds."""
        relative = {k: v for k, v in self.path_fields().items() if not Path(v).expanduser().is_absolute()}
        if not relative:
            return self
        for base in (Path.cwd(), *Path(near).resolve().parents):
            if all((base / v).exists() for v in relative.values()):
                if base != Path.cwd():
                    print(f"note: data paths of this run are relative ({', '.join(relative.values())}); found them "
                          f"under {base}")
                return self.absolute(base)
        return self


def _categories(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_mask(folder: Path, stem: str) -> Path | None:
    if not folder.is_dir():
        return None
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


def seeded_split(items: Sequence, ratio: float, seed: int) -> tuple[list, list]:
    """(first ``floor(ratio * n)`` of a seeded shuffle, the rest), each sorted by name."""
    order = sorted(items)
    random.Random(seed).shuffle(order)
    k = int(ratio * len(order))
    return sorted(order[:k]), sorted(order[k:])


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} {path} does not exist or is not a folder")
    return path


def _mask_for(image: Path, folder: Path, suffix_stem: str = "") -> Path:
    mask = _find_mask(folder, image.stem + suffix_stem) if folder.is_dir() else None
    if mask is None:
        raise DatasetError(f"image {image} has no mask: looked for {folder / (image.stem + suffix_stem)}.(png|bmp|...)")
    return mask


def read_mtd(config: DataConfig) -> DatasetIndex:
    """Magnetic Tile Defects (see module docstring)."""
    root = _require_dir(Path(config.root), "MTD root")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("MT_"))
    if not any(f.name == "MT_Free" for f in folders):
        raise DatasetError(f"{root} is not an MTD root: no MT_Free folder (found {[f.name for f in folders]})")

    def images(folder: Path) -> list[Path]:
        # Images are .jpg; the .png of the same name is the mask.
        return sorted(p for p in (folder / "Imgs").iterdir() if p.suffix.lower() == ".jpg")

    free = images(root / "MT_Free")
    train, test_free = seeded_split(free, config.train_ratio, config.seed)
    test = [Sample(p, GOOD, "good", None) for p in test_free]
    for folder in folders:
        if folder.name == "MT_Free":
            continue
        kind = folder.name[3:].lower()
        for img in images(folder):
            mask = img.with_suffix(".png")
            if not mask.is_file():
                raise DatasetError(f"MTD image {img} has no mask {mask}")
            test.append(Sample(img, DEFECTIVE, kind, mask))
    return DatasetIndex(name="mtd", train=tuple(Sample(p) for p in train), test=tuple(test))


def _label_is_empty(path: Path) -> bool:
    return not bool(read_mask(path).any())


def read_kolektorsdd(config: DataConfig) -> DatasetIndex:
    """KolektorSDD (see module docstring)."""
    root = _require_dir(Path(config.root), "KolektorSDD root")
    parts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("kos"))
    if not parts:
        raise DatasetError(f"{root} is not a KolektorSDD root: no kosNN folders")
    good: list[Path] = []
    defective: list[Sample] = []
    for part in parts:
        for img in sorted(p for p in part.iterdir() if p.suffix.lower() == ".jpg" and not p.stem.endswith("_label")):
            label = _mask_for(img, part, "_label")
            if _label_is_empty(label):
                good.append(img)
            else:
                defective.append(Sample(img, DEFECTIVE, "crack", label))
    train, test_good = seeded_split(good, config.train_ratio, config.seed)
    test = [Sample(p, GOOD, "good", None) for p in test_good] + defective
    return DatasetIndex(name="kolektorsdd", train=tuple(Sample(p) for p in train), test=tuple(test))


def read_btad(config: DataConfig) -> DatasetIndex:
    """BeanTech AD (see module docstring)."""
    base = category_dir(Path(config.root), config.category)
    train_dir = _require_dir(base / "train" / "ok", "BTAD training folder")
    train = tuple(Sample(p) for p in list_images(train_dir))
    if not train:
        raise DatasetError(f"training folder {train_dir} contains no images")
    test: list[Sample] = []
    if (base / "test" / "ok").is_dir():
        test += [Sample(p, GOOD, "good", None) for p in list_images(base / "test" / "ok")]
    if (base / "test" / "ko").is_dir():
        test += [Sample(p, DEFECTIVE, "ko", _mask_for(p, base / "ground_truth" / "ko"))
                 for p in list_images(base / "test" / "ko")]
    return DatasetIndex(name=f"btad/{config.category}", train=train, test=tuple(test))


def read_visa(config: DataConfig) -> DatasetIndex:
    """VisA, from its split file when present, else the raw layout with a seeded split."""
    root = _require_dir(Path(config.root), "VisA root")
    split_file = root / "split_csv" / "1cls.csv"
    if split_file.is_file():
        return _read_visa_csv(root, split_file, config)
    base = category_dir(root, config.category)
    normal_dir = _require_dir(base / "Data" / "Images" / "Normal", "VisA normal folder")
    normal = list_images(normal_dir)
    train, test_normal = seeded_split(normal, config.train_ratio, config.seed)
    test = [Sample(p, GOOD, "good", None) for p in test_normal]
    anomaly_dir = base / "Data" / "Images" / "Anomaly"
    if anomaly_dir.is_dir():
        test += [Sample(p, DEFECTIVE, "anomaly", _mask_for(p, base / "Data" / "Masks" / "Anomaly"))
                 for p in list_images(anomaly_dir)]
    return DatasetIndex(name=f"visa/{config.category}", train=tuple(Sample(p) for p in train), test=tuple(test))


def _read_visa_csv(root: Path, split_file: Path, config: DataConfig) -> DatasetIndex:
    with open(split_file, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    needed = {"object", "split", "label", "image", "mask"}
    if not rows or not needed <= set(rows[0]):
        raise DatasetError(f"{split_file} must have the columns {sorted(needed)}")
    objects = sorted({r["object"] for r in rows})
    if config.category not in objects:
        raise DatasetError(f"unknown category {config.category!r} in {split_file}; categories: {', '.join(objects)}")
    train, test = [], []
    for r in rows:
        if r["object"] != config.category:
            continue
        image = root / r["image"]
        if not image.is_file():
            raise DatasetError(f"{split_file} names {image}, which does not exist")
        if r["label"] not in ("normal", "anomaly"):
            raise DatasetError(f"{split_file}: label must be normal or anomaly, got {r['label']!r} for {image}")
        defective = r["label"] == "anomaly"
        mask = root / r["mask"] if defective and r["mask"] else None
        if defective and (mask is None or not mask.is_file()):
            raise DatasetError(f"anomalous image {image} has no mask (expected {mask})")
        if r["split"] == "train":
            if defective:
                raise DatasetError(f"{split_file} puts anomalous image {image} in the training split")
            train.append(Sample(image))
        else:
            test.append(Sample(image, DEFECTIVE if defective else GOOD, "anomaly" if defective else "good", mask))
    return DatasetIndex(name=f"visa/{config.category}", train=tuple(train), test=tuple(test))


def read_folder(config: DataConfig) -> DatasetIndex:
    """Plain folders, anomalib's Folder idea (see module docstring)."""
    if not config.normal_dir:
        raise DatasetError("the folder format needs normal_dir (--normal-dir): a folder of defect-free images")
    normal = list_images(_require_dir(Path(config.normal_dir), "normal_dir"))
    if not normal:
        raise DatasetError(f"normal_dir {config.normal_dir} contains no images")
    if config.normal_test_dir:
        train, test_normal = normal, list_images(_require_dir(Path(config.normal_test_dir), "normal_test_dir"))
    else:
        train, test_normal = seeded_split(normal, config.train_ratio, config.seed)
    test = [Sample(p, GOOD, "good", None) for p in test_normal]
    has_masks = bool(config.mask_dir)
    if config.abnormal_dir:
        mask_dir = Path(config.mask_dir) if config.mask_dir else None
        if mask_dir is not None:
            _require_dir(mask_dir, "mask_dir")
        for p in list_images(_require_dir(Path(config.abnormal_dir), "abnormal_dir")):
            test.append(Sample(p, DEFECTIVE, "abnormal", _mask_for(p, mask_dir) if mask_dir else None))
    name = f"folder/{Path(config.normal_dir).name}"
    return DatasetIndex(name=name, train=tuple(Sample(p) for p in train), test=tuple(test), has_masks=has_masks)


FORMATS: dict[str, Callable[[DataConfig], DatasetIndex]] = {
    "mvtec": read_mvtec,
    "mpdd": read_mvtec,
    "visa": read_visa,
    "mtd": read_mtd,
    "btad": read_btad,
    "kolektorsdd": read_kolektorsdd,
    "folder": read_folder,
}


CATEGORY_FORMATS = ("mvtec", "mpdd", "visa", "btad")  # formats whose root holds categories


def is_mask_file(path: Path, dataset: str) -> bool:
    """Whether ``path`` is a ground-truth mask by the naming of format ``dataset`` (so that ``predict``
    pointed at a dataset folder scores its parts, not its masks)."""
    path = Path(path)
    parents = {p.name.lower() for p in path.parents}
    if dataset in ("mvtec", "mpdd", "btad", "visa"):
        return "ground_truth" in parents or "masks" in parents or path.stem.endswith("_mask")
    if dataset == "kolektorsdd":
        return path.stem.endswith("_label")
    if dataset == "mtd":  # Imgs/NAME.jpg is the image, Imgs/NAME.png its mask
        return path.suffix.lower() == ".png" and path.with_suffix(".jpg").is_file()
    return False


def available_categories(config: DataConfig) -> list[str]:
    """The categories under ``config.root`` (the objects of VisA's split file, where there is one)."""
    root = Path(config.root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    split_file = root / "split_csv" / "1cls.csv"
    if config.dataset == "visa" and split_file.is_file():
        with open(split_file, newline="", encoding="utf-8") as fh:
            return sorted({r["object"] for r in csv.DictReader(fh)})
    return [c for c in _categories(root) if c != "split_csv"]


def selected_categories(config: DataConfig) -> list[str]:
    """The categories ``config.category`` names: one, a comma-separated list, or ``all``."""
    if config.dataset not in CATEGORY_FORMATS:
        return [""]
    if config.category.strip() == "all":
        found = available_categories(config)
        if not found:
            raise DatasetError(f"--category all: no categories in {config.root}")
        return found
    names = [c.strip() for c in config.category.split(",") if c.strip()]
    if len(set(names)) != len(names):
        raise DatasetError(f"category {config.category!r} names a category twice")
    return names or [config.category]


def build_index(config: DataConfig) -> DatasetIndex:
    """Read the dataset that ``config`` names: one index over all of its categories."""
    read = FORMATS[config.dataset]
    parts = []
    for category in selected_categories(config):
        index = read(replace(config, category=category) if category else config)
        tag = category if category else ""
        train, val = validation_split(index.train, config.val_ratio, config.seed)
        parts.append(DatasetIndex(index.name, tuple(replace(s, category=tag) for s in train),
                                  tuple(replace(s, category=tag) for s in index.test), index.has_masks, index.notes,
                                  val=tuple(replace(s, category=tag) for s in val)))
    defects = validation_defects(config)
    if len(parts) == 1:
        return replace(parts[0], val=parts[0].val + defects)
    root_name = f"{config.dataset}/{','.join(p.train[0].category if p.train else p.name for p in parts)}"
    return DatasetIndex(name=root_name if len(root_name) < 80 else f"{config.dataset}/{len(parts)} categories",
                        train=tuple(s for p in parts for s in p.train), test=tuple(s for p in parts for s in p.test),
                        has_masks=all(p.has_masks for p in parts), notes=tuple(n for p in parts for n in p.notes),
                        val=tuple(s for p in parts for s in p.val) + defects)


def validation_split(train: Sequence[Sample], ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training, validation): a seeded ``ratio`` of the defect-free training images held out, at least one
    when ``ratio`` > 0 and there are two or more."""
    if ratio <= 0 or len(train) < 2:
        return list(train), []
    by_path = {s.image: s for s in train}
    order = sorted(by_path)
    random.Random(seed + 7919).shuffle(order)
    held = set(order[:min(len(order) - 1, max(1, round(ratio * len(order))))])
    return [by_path[p] for p in sorted(by_path) if p not in held], [by_path[p] for p in sorted(held)]


def validation_defects(config: DataConfig) -> tuple[Sample, ...]:
    """The user's labelled validation defects (``val_abnormal_dir``, masks by stem in ``val_mask_dir``)."""
    if not config.val_abnormal_dir:
        return ()
    mask_dir = Path(config.val_mask_dir) if config.val_mask_dir else None
    if mask_dir is not None:
        _require_dir(mask_dir, "val_mask_dir")
    images = list_images(_require_dir(Path(config.val_abnormal_dir), "val_abnormal_dir"))
    if not images:
        raise DatasetError(f"val_abnormal_dir {config.val_abnormal_dir} contains no images")
    return tuple(Sample(p, DEFECTIVE, "abnormal", _mask_for(p, mask_dir) if mask_dir else None) for p in images)
