from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddad.data.dataset import ImageSet
from ddad.data.formats import DataConfig, build_index
from ddad.data.io import DatasetError, read_image, read_mask
from ddad.data.synth import SynthConfig, generate


def _mvtec_tree(root, n_train=2, mask_size=(16, 16)):
    cat = root / "widget"
    (cat / "train" / "good").mkdir(parents=True)
    (cat / "test" / "good").mkdir(parents=True)
    (cat / "test" / "crack").mkdir(parents=True)
    (cat / "ground_truth" / "crack").mkdir(parents=True)
    for i in range(n_train):
        Image.new("RGB", (16, 16), (i * 10, 50, 90)).save(cat / "train" / "good" / f"{i:03d}.png")
    Image.new("RGB", (16, 16)).save(cat / "test" / "good" / "000.png")
    Image.new("RGB", (16, 16)).save(cat / "test" / "crack" / "000.jpg")
    mask = np.zeros(mask_size[::-1], dtype=np.uint8)
    mask[2:6, 3:9] = 255
    Image.fromarray(mask).save(cat / "ground_truth" / "crack" / "000_mask.png")
    return cat


def test_mvtec_layout_counts_labels_and_masks(synth_root):
    index = build_index(DataConfig(root=str(synth_root), category="washer", image_size=32, val_ratio=0))
    assert len(index.train) == 8
    assert len(index.test) == 3 + 3 * 2
    defective = [s for s in index.test if s.label == 1]
    assert {s.defect_type for s in defective} == {"scratch", "spot", "missing"}
    for s in defective:
        assert s.mask is not None and s.mask.stem == s.image.stem + "_mask"
        assert s.mask.parent.name == s.defect_type
    assert all(s.mask is None for s in index.test if s.label == 0)
    stats = index.statistics()
    assert stats["test_good"] == 3 and stats["test_defective"] == 6


def test_images_scaled_to_minus_one_one_and_resized(synth_root):
    index = build_index(DataConfig(root=str(synth_root), category="stripes", image_size=16))
    item = ImageSet(index.test, 16, 3)[len(index.test) - 1]
    assert item["image"].shape == (3, 16, 16)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["image"].min() < -0.2  # really spans the range, not [0, 1]
    assert item["mask"].shape == (1, 16, 16)


def test_mask_resized_nearest_and_binary(tmp_path):
    """Masks are resized exactly as PIL's NEAREST does, on a mask where bilinear resizing plus a threshold
    gives another answer (thin lines and single pixels)."""
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    mask = np.where(rng.random((23, 23)) < 0.3, 255, 0).astype(np.uint8)
    mask[:, 7] = 255  # a one-pixel line
    mask[0, 0] = 100  # below the threshold: background
    Image.fromarray(mask).save(tmp_path / "m.png")
    for size in (9, 16, 40):
        m = read_mask(tmp_path / "m.png", size=size)
        assert m.shape == (1, size, size) and set(torch.unique(m).tolist()) <= {0.0, 1.0}
        binary = Image.fromarray(np.where(mask > 127, 255, 0).astype(np.uint8))
        reference = np.asarray(binary.resize((size, size), Image.NEAREST)) > 127
        assert np.array_equal(m[0].numpy() > 0.5, reference), size
        soft = F.interpolate(torch.from_numpy(mask > 127).float()[None, None], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)[0, 0] > 0.5
        assert not np.array_equal(soft.numpy(), reference), f"the mask does not tell the two apart at {size}"


def test_grey_and_rgb_channels_and_modes(tmp_path):
    arr = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    Image.fromarray(arr, mode="L").save(tmp_path / "grey.png")
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.stack([arr] * 3 + [np.full_like(arr, 255)], -1), mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(arr.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    Image.fromarray(arr, mode="L").convert("P").save(tmp_path / "palette.png")
    g1 = read_image(tmp_path / "grey.png", 1)
    g3 = read_image(tmp_path / "grey.png", 3)
    assert g1.shape == (1, 8, 8) and g3.shape == (3, 8, 8)
    assert torch.allclose(g3[0], g1[0]) and torch.allclose(g3[2], g1[0])
    assert torch.allclose(read_image(tmp_path / "rgb.png", 1), g1, atol=2 / 255)
    assert torch.allclose(read_image(tmp_path / "rgba.png", 3), g3, atol=1e-6)
    assert torch.allclose(read_image(tmp_path / "grey16.png", 1), g1, atol=1e-4)
    assert torch.allclose(read_image(tmp_path / "palette.png", 1), g1, atol=2 / 255)


def test_corrupt_file_error_names_it(tmp_path):
    cat = _mvtec_tree(tmp_path)
    bad = cat / "train" / "good" / "001.png"
    bad.write_bytes(b"not an image at all")
    index = build_index(DataConfig(root=str(tmp_path), category="widget", image_size=8))
    with pytest.raises(DatasetError, match="001.png"):
        ImageSet(index.train, 8, 3).stack()


def test_empty_train_folder_error(tmp_path):
    cat = _mvtec_tree(tmp_path, n_train=0)
    with pytest.raises(DatasetError, match=str(cat / "train" / "good")):
        build_index(DataConfig(root=str(tmp_path), category="widget"))


def test_mask_size_mismatch_error_names_both(tmp_path):
    _mvtec_tree(tmp_path, mask_size=(20, 16))
    index = build_index(DataConfig(root=str(tmp_path), category="widget", image_size=8))
    defective = [i for i, s in enumerate(index.test) if s.label == 1]
    with pytest.raises(DatasetError, match="000_mask.png.*20x16.*000.jpg.*16x16"):
        ImageSet(index.test, 8, 3)[defective[0]]


def test_unknown_category_lists_existing(synth_root):
    with pytest.raises(DatasetError, match=r"'bottle'.*stripes, washer"):
        build_index(DataConfig(root=str(synth_root), category="bottle"))


def test_missing_mask_is_an_error(tmp_path):
    cat = _mvtec_tree(tmp_path)
    (cat / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match="000.jpg has no mask"):
        build_index(DataConfig(root=str(tmp_path), category="widget"))


def test_synth_is_seeded(tmp_path):
    generate(tmp_path / "a", SynthConfig(size=16, train=2, test_good=1, test_defective_per_type=1, seed=3))
    generate(tmp_path / "b", SynthConfig(size=16, train=2, test_good=1, test_defective_per_type=1, seed=3))
    generate(tmp_path / "c", SynthConfig(size=16, train=2, test_good=1, test_defective_per_type=1, seed=4))
    rel = "stripes/test/spot/000.png"
    a, b, c = (np.asarray(Image.open(tmp_path / x / rel)) for x in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    mask = np.asarray(Image.open(tmp_path / "a" / "stripes/ground_truth/spot/000_mask.png"))
    assert set(np.unique(mask)) == {0, 255}
