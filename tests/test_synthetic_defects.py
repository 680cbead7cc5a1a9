"""Synthetic validation defects of every kind, and the robust rule that tunes on them: masks that are exactly
the changed pixels, draws that depend on the seed and the image alone, defects that stay inside an object's
region, sizes down to a few pixels, thin scratches, Poisson blending that solves its equation, and a rule that
keeps the current settings on a weak signal and takes a clear winner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from ddad.data.anomalies import KINDS, SyntheticAnomalies, synthetic_origin
from ddad.data.defects import poisson_blend
from ddad.engine.tuning import robust_choice


def _textured(n: int, channels: int = 3, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth random textures in [-1, 1] (blurred noise plus a gradient): every kind can change them."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, channels, size, size)), sigma=(0, 0, 2, 2))
    ramp = np.linspace(-0.5, 0.5, size)[None, None, None, :]
    return torch.from_numpy(np.clip(noise / noise.std() * 0.3 + ramp, -1, 1).astype(np.float32))


def test_there_are_eight_kinds_and_every_default_mixes_them():
    assert set(KINDS) == {"perlin", "paste", "patch", "scratch", "scar", "warp", "blob", "colour"}
    drawn = SyntheticAnomalies(seed=1).make(_textured(64, size=32)).kinds
    assert len(set(drawn)) >= 6  # 64 images: the mix holds most kinds


@pytest.mark.parametrize("kind", KINDS)
def test_each_kinds_mask_is_exactly_the_changed_pixels_and_follows_the_seed_alone(kind):
    images = _textured(10)
    donors = [_textured(4, seed=9)] * len(images)
    made = SyntheticAnomalies((kind,), seed=5).make(images, donors)
    changed = (made.images != images).any(dim=1, keepdim=True).float()
    assert torch.equal(made.masks, changed) and torch.all(made.masks.sum(dim=(1, 2, 3)) > 0)
    assert made.kinds == [kind] * len(images)
    assert made.images.min() >= -1 and made.images.max() <= 1  # never leaves the image's value range
    order = [7, 2, 9, 0]  # the same defect for the same seed and image, in a subset and another order
    again = SyntheticAnomalies((kind,), seed=5).make(images[order], [donors[i] for i in order])
    assert torch.equal(again.images, made.images[order]) and torch.equal(again.masks, made.masks[order])
    other = SyntheticAnomalies((kind,), seed=6).make(images, donors)
    assert not torch.equal(other.masks, made.masks)
    if kind == "patch":  # the patch comes from the donor pool given (another image of the category)
        elsewhere = SyntheticAnomalies((kind,), seed=5).make(images, [_textured(4, seed=10)] * len(images))
        assert not torch.equal(elsewhere.images, made.images)


@pytest.mark.parametrize("kind", KINDS)
def test_a_defect_never_leaves_the_objects_region(kind):
    images = _textured(8)
    yy, xx = np.mgrid[0:48, 0:48]
    disc = torch.from_numpy((yy - 24) ** 2 + (xx - 20) ** 2 <= 15 ** 2)  # the object; outside it: background
    made = SyntheticAnomalies((kind,), seed=2).make(images, regions=[disc] * len(images))
    outside = ~disc
    assert torch.equal(made.images[:, :, outside], images[:, :, outside])
    assert not made.masks[:, 0, outside].any() and torch.all(made.masks.sum(dim=(1, 2, 3)) > 0)


def test_sizes_reach_down_to_a_few_pixels_and_scratches_are_thin():
    images = _textured(60, channels=1, size=64)
    areas = {}
    for kind in ("scratch", "blob", "scar", "patch", "colour"):
        masks = SyntheticAnomalies((kind,), seed=0).make(images).masks[:, 0].numpy().astype(bool)
        areas[kind] = masks.sum(axis=(1, 2))
        if kind == "scratch":  # at most 3 px wide: a 5 x 5 erosion leaves nothing
            assert not ndimage.binary_erosion(masks, structure=np.ones((1, 5, 5))).any()
    for kind, area in areas.items():
        assert area.min() <= 25, (kind, area.min())  # a defect of a few pixels
        assert area.max() >= 60, (kind, area.max())  # and larger ones in the same mix


def test_poisson_blending_solves_its_equation_with_the_targets_border():
    rng = np.random.default_rng(0)
    target = rng.uniform(-0.3, 0.3, (2, 9, 12)).astype(np.float32)
    source = rng.uniform(-0.3, 0.3, (2, 9, 12)).astype(np.float32)
    out = poisson_blend(target, source).astype(np.float64)
    border = np.ones((9, 12), dtype=bool)
    border[1:-1, 1:-1] = False
    assert np.array_equal(out[:, border], target[:, border])

    def laplacian(f):  # 5-point, at the interior pixels
        return f[:, :-2, 1:-1] + f[:, 2:, 1:-1] + f[:, 1:-1, :-2] + f[:, 1:-1, 2:] - 4 * f[:, 1:-1, 1:-1]

    np.testing.assert_allclose(laplacian(out), laplacian(source.astype(np.float64)), atol=1e-5)


def test_the_validation_split_names_each_defects_kind_and_seed(tmp_path):
    from ddad.data.formats import DataConfig
    from ddad.data.splits import load_validation_split
    from ddad.data.synth import SynthConfig, generate

    generate(tmp_path / "data", SynthConfig(size=32, train=12, test_good=1, test_defective_per_type=1, seed=0))
    data = DataConfig(root=str(tmp_path / "data"), category="washer", image_size=32, val_ratio=0.25)
    split = load_validation_split(data, progress=False, seeds=(4, 7))
    good = int((split.labels == 0).sum())
    origins = [synthetic_origin(s) for s in split.samples]
    assert origins[:good] == [None] * good and len(origins) == 3 * good
    assert [o[1] for o in origins[good:]] == [4] * good + [7] * good
    assert all(o[0] in KINDS for o in origins[good:])
    again = load_validation_split(data, progress=False, seeds=(7,))  # seed 7's defects alone: the same images
    assert torch.equal(again.images[good:], split.images[2 * good:])
    # too few defects for min_defects: the seeds after the largest given are added, the given ones unchanged
    more = load_validation_split(data, progress=False, seeds=(4, 7), min_defects=4 * good + 1)
    assert [synthetic_origin(s)[1] for s in more.samples[good:]] == sum(([k] * good for k in (4, 7, 8, 9, 10)), [])
    assert torch.equal(more.images[:3 * good], split.images)
    enough = load_validation_split(data, progress=False, seeds=(4, 7), min_defects=2 * good)
    assert len(enough.samples) == 3 * good  # already enough: nothing added


def test_the_robust_rule_keeps_the_current_settings_on_a_weak_signal_and_takes_a_clear_winner():
    rng = np.random.default_rng(0)
    seeds = 5
    noise = rng.normal(0, 0.02, (6, seeds))  # the objective's spread over defect seeds
    weak = 0.70 + noise + np.array([0.0, 0.004, -0.01, 0.006, 0.0, 0.002])[:, None]  # gains far below 0.02
    chosen, record = robust_choice(weak)
    assert chosen == 0 and record["best_on_mean"] != 0 and record["kept_current"]
    assert record["standard_error"] > abs(record["gain_over_current"])
    strong = weak.copy()
    strong[4] += 0.10  # a candidate better by five spreads on every seed
    chosen, record = robust_choice(strong)
    assert chosen == 4 and not record["kept_current"] and record["gain_over_current"] > 0.09
    one_seed = np.array([[0.70], [0.71], [0.69]])  # no spread to judge by: the best is taken
    assert robust_choice(one_seed)[0] == 1
    no_current = weak.copy()
    no_current[0] = -np.inf  # the current settings have no validation figure: nothing to keep, the best is taken
    assert robust_choice(no_current)[0] == int(np.argmax(weak[1:].mean(axis=1))) + 1
