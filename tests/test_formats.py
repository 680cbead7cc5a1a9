from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from ddad.data.dataset import ImageSet
from ddad.data.formats import DataConfig, build_index
from ddad.data.io import DatasetError

from .conftest import SHARED


def img(path, value=128, size=(12, 10), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def mask(path, box=(2, 2, 5, 5), size=(12, 10), value=255):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(size[::-1], dtype=np.uint8)
    if box:
        arr[box[1]:box[3], box[0]:box[2]] = value
    Image.fromarray(arr).save(path)


def test_mtd_split_is_seeded_and_counts(tmp_path):
    for i in range(10):
        img(tmp_path / "MT_Free" / "Imgs" / f"f{i}.jpg")
        mask(tmp_path / "MT_Free" / "Imgs" / f"f{i}.png", box=None)
    for i in range(3):
        img(tmp_path / "MT_Crack" / "Imgs" / f"c{i}.jpg")
        mask(tmp_path / "MT_Crack" / "Imgs" / f"c{i}.png", value=200)
    a = build_index(DataConfig(val_ratio=0, dataset="mtd", root=str(tmp_path), seed=0))
    b = build_index(DataConfig(val_ratio=0, dataset="mtd", root=str(tmp_path), seed=0))
    c = build_index(DataConfig(val_ratio=0, dataset="mtd", root=str(tmp_path), seed=1))
    assert len(a.train) == 8 and len(a.test) == 2 + 3
    assert a.train == b.train and a.train != c.train
    crack = [s for s in a.test if s.label == 1]
    assert {s.defect_type for s in crack} == {"crack"} and all(s.mask.suffix == ".png" for s in crack)
    m = ImageSet(a.test, 10, 1)[len(a.test) - 1]["mask"]
    assert set(m.unique().tolist()) == {0.0, 1.0}  # 200 > 127: defect, binarised


def test_mtd_missing_mask_names_both(tmp_path):
    img(tmp_path / "MT_Free" / "Imgs" / "f0.jpg")
    img(tmp_path / "MT_Break" / "Imgs" / "b0.jpg")
    with pytest.raises(DatasetError, match=r"b0\.jpg.*b0\.png"):
        build_index(DataConfig(val_ratio=0, dataset="mtd", root=str(tmp_path)))


def test_kolektorsdd_labels_from_non_empty_masks(tmp_path):
    for k in range(3):
        img(tmp_path / "kos01" / f"Part{k}.jpg")
        mask(tmp_path / "kos01" / f"Part{k}_label.png", box=(1, 1, 3, 3) if k == 2 else None)
    img(tmp_path / "kos02" / "Part0.jpg")
    mask(tmp_path / "kos02" / "Part0_label.bmp", box=None)
    index = build_index(DataConfig(val_ratio=0, dataset="kolektorsdd", root=str(tmp_path), train_ratio=0.5))
    assert len(index.train) == 1 and sum(s.label == 0 for s in index.test) == 2  # floor(0.5 * 3 good)
    defective = [s for s in index.test if s.label == 1]
    assert [s.image.name for s in defective] == ["Part2.jpg"]
    img(tmp_path / "kos03" / "Part0.jpg")
    with pytest.raises(DatasetError, match=r"kos03/Part0\.jpg has no mask"):
        build_index(DataConfig(val_ratio=0, dataset="kolektorsdd", root=str(tmp_path)))


def test_btad_masks_may_differ_in_extension(tmp_path):
    base = tmp_path / "01"
    img(base / "train" / "ok" / "0000.bmp")
    img(base / "test" / "ok" / "0001.bmp")
    img(base / "test" / "ko" / "0002.bmp")
    mask(base / "ground_truth" / "ko" / "0002.png")
    index = build_index(DataConfig(val_ratio=0, dataset="btad", root=str(tmp_path), category="01"))
    assert len(index.train) == 1 and [s.label for s in index.test] == [0, 1]
    assert index.test[1].mask.name == "0002.png"


def test_visa_split_csv_and_raw_layout(tmp_path):
    root = tmp_path / "visa"
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/000.JPG", ""),
            ("candle", "test", "normal", "candle/Data/Images/Normal/001.JPG", ""),
            ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/100.JPG", "candle/Data/Masks/Anomaly/100.png"),
            ("pcb1", "train", "normal", "pcb1/Data/Images/Normal/000.JPG", "")]
    for r in rows:
        img(root / r[3], mode="RGB")
        if r[4]:
            mask(root / r[4], value=1)  # VisA masks: non-zero is defect
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    index = build_index(DataConfig(val_ratio=0, dataset="visa", root=str(root), category="candle"))
    assert len(index.train) == 1 and [s.label for s in index.test] == [0, 1]
    with pytest.raises(DatasetError, match="candle, pcb1"):
        build_index(DataConfig(val_ratio=0, dataset="visa", root=str(root), category="bottle"))
    # raw layout (no split file): seeded split of the normal images
    (root / "split_csv" / "1cls.csv").unlink()
    for i in range(2, 6):
        img(root / "candle" / "Data" / "Images" / "Normal" / f"00{i}.JPG", mode="RGB")
    raw = build_index(DataConfig(val_ratio=0, dataset="visa", root=str(root), category="candle", train_ratio=0.5))
    assert len(raw.train) == 3 and sum(s.label for s in raw.test) == 1


def test_folder_format_with_masks_and_split(tmp_path):
    for i in range(6):
        img(tmp_path / "ok" / f"{i}.png")
    for i in range(2):
        img(tmp_path / "bad" / f"b{i}.png")
        mask(tmp_path / "masks" / f"b{i}.png")
    cfg = DataConfig(val_ratio=0, dataset="folder", normal_dir=str(tmp_path / "ok"), abnormal_dir=str(tmp_path / "bad"),
                     mask_dir=str(tmp_path / "masks"), train_ratio=0.5)
    index = build_index(cfg)
    assert len(index.train) == 3 and len(index.test) == 5 and index.has_masks
    no_masks = build_index(DataConfig(val_ratio=0, dataset="folder", normal_dir=str(tmp_path / "ok"),
                                      abnormal_dir=str(tmp_path / "bad")))
    assert not no_masks.has_masks and all(s.mask is None for s in no_masks.test)
    (tmp_path / "masks" / "b1.png").unlink()
    with pytest.raises(DatasetError, match=r"b1\.png has no mask"):
        build_index(cfg)


def test_skip_bad_files_drops_and_reports(tmp_path):
    for i in range(3):
        img(tmp_path / "ok" / f"{i}.png")
    (tmp_path / "ok" / "1.png").write_bytes(b"garbage")
    img(tmp_path / "test" / "t.png")
    index = build_index(DataConfig(val_ratio=0, dataset="folder", normal_dir=str(tmp_path / "ok"),
                                   normal_test_dir=str(tmp_path / "test")))
    assert len(index.train) == 3  # with a normal_test_dir every normal image trains
    ds = ImageSet(index.train, 8, 1)
    skipped = ds.drop_unreadable()
    assert [s.image.name for s, _ in skipped] == ["1.png"] and "cannot decode" in skipped[0][1]
    assert len(ds) == 2 and ds.stack().shape == (2, 1, 8, 8)


@pytest.mark.skipif(not (SHARED / "data" / "mtd").is_dir(), reason="../shared/data/mtd absent")
def test_real_mtd_counts():
    index = build_index(DataConfig(val_ratio=0, dataset="mtd", root=str(SHARED / "data" / "mtd")))
    st = index.statistics()
    assert (st["train"], st["test_good"], st["test_defective"]) == (761, 191, 392)


@pytest.mark.skipif(not (SHARED / "data" / "kolektorsdd").is_dir(), reason="../shared/data/kolektorsdd absent")
def test_real_kolektorsdd_counts():
    index = build_index(DataConfig(val_ratio=0, dataset="kolektorsdd", root=str(SHARED / "data" / "kolektorsdd")))
    st = index.statistics()
    assert st["train"] + st["test_good"] == 348 and st["test_defective"] == 52
