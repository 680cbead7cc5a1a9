from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from ddad.metrics import f1_optimal_threshold, pixel_auroc, pro_auc, roc_auc
from ddad.scoring import ScoreScale, ScoringConfig, anomaly_map, combine, feature_distance, gaussian_blur, image_scores, pixel_distance


def brute_auroc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_pro(maps, masks, limit=0.3):
    """PRO by definition: every distinct threshold, regions by 8-connectivity, trapezoid to `limit`."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    neg = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for th in sorted(np.unique(maps))[::-1]:
        pred = maps >= th
        fpr = (pred & neg).sum() / neg.sum()
        pro = np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, size=40).astype(float)  # many ties
    y = rng.integers(0, 2, size=40)
    assert roc_auc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)
    maps, masks = s.reshape(2, 4, 5), y.reshape(2, 4, 5)
    assert pixel_auroc(maps, masks, chunk=7) == pytest.approx(brute_auroc(s, y), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_pro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8:11, 8:9] = True
    masks[1, 6:9, 1:4] = True
    masks[1, 9, 4] = True  # diagonal neighbour: same 8-connected region
    maps = rng.random((3, 12, 12)) + masks * rng.random((3, 12, 12)) * 0.8
    if seed % 2:
        maps = np.round(maps * 8) / 8  # ties
    assert pro_auc(maps, masks) == pytest.approx(brute_pro(maps, masks), abs=1e-10)


def test_perfect_map_scores_one_and_no_regions_is_none():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 3:6, 3:6] = True
    assert pro_auc(masks.astype(float), masks) == pytest.approx(1.0)
    assert pixel_auroc(masks.astype(float), masks) == 1.0
    assert pro_auc(np.random.rand(2, 10, 10), np.zeros((2, 10, 10))) is None
    assert roc_auc([0.1, 0.2], [0, 0]) is None


def test_f1_threshold_separates_a_separable_set():
    s, y = np.array([0.1, 0.2, 0.3, 0.8, 0.9]), np.array([0, 0, 0, 1, 1])
    assert f1_optimal_threshold(s, y) == 0.8


def test_gaussian_blur_matches_scipy():
    m = torch.rand(2, 1, 20, 23)
    ours = gaussian_blur(m, 2.0)
    ref = np.stack([ndimage.gaussian_filter(m[i, 0].numpy().astype(np.float64), 2.0, mode="reflect", truncate=4.0)
                    for i in range(2)])
    assert np.allclose(ours[:, 0].numpy(), ref, atol=1e-5)
    # a kernel wider than the image still works (small images, sigma 4)
    small = torch.rand(1, 1, 8, 8)
    ref_small = ndimage.gaussian_filter(small[0, 0].numpy().astype(np.float64), 4.0, mode="reflect", truncate=4.0)
    assert np.allclose(gaussian_blur(small, 4.0)[0, 0].numpy(), ref_small, atol=1e-5)


def test_eq9_normalisations():
    """calibrated and image maxima never couple the images of a batch; the authors' batch maxima do.
    Calibrated: D = v * max_f / max_p * D_p + D_f with the stored constants."""
    torch.manual_seed(0)
    dp, df = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    dp[3] *= 10  # one image with a much larger pixel distance
    batch = combine(dp, df, v=1.0, normalization="image")
    alone = combine(dp[:1], df[:1], v=1.0, normalization="image")
    assert torch.allclose(batch[:1], alone)
    assert torch.allclose((batch - df)[0].amax(), df[0].amax())  # v max(Df)/max(Dp) Dp peaks at max(Df)
    authors = combine(dp, df, v=1.0, normalization="batch")
    assert not torch.allclose(authors[:1], alone, atol=1e-3)
    scale = ScoreScale(max_pixel=2.0, max_feature=0.5, n_images=10)
    cal = combine(dp, df, v=2.0, normalization="calibrated", scale=scale)
    assert torch.allclose(cal, 2.0 * 0.5 / 2.0 * dp + df)
    assert torch.allclose(cal[:1], combine(dp[:1], df[:1], v=2.0, normalization="calibrated", scale=scale))
    # the large residual of image 3 stays large (per image it would be squashed to image 3's own D_f peak)
    assert (cal[3] - df[3]).amax() > 3 * (batch[3] - df[3]).amax()
    with pytest.raises(ValueError, match="ScoreScale"):
        combine(dp, df, 1.0, normalization="calibrated")
    with pytest.raises(ValueError, match="positive"):
        ScoreScale(0.0, 1.0, 3)
    with pytest.raises(ValueError, match="normalization"):
        ScoringConfig(normalization="dataset")


def test_positional_normalisation_divides_by_good_means():
    """positional: D_p and D_f divided at each pixel by their mean over good images (floored), then Eq. 9
    with the maxima of the divided good maps; a border that every good image has high stops dominating."""
    torch.manual_seed(0)
    good_p, good_f = torch.rand(6, 1, 8, 8) * 0.1, torch.rand(6, 1, 8, 8)
    good_p[..., 0, :] += 1.0  # a bad top row in every good image
    good_p[..., 3, 3] = 0.0  # a pixel where good images never differ: the floor keeps the division finite
    scale = ScoreScale.from_distances(good_p, good_f, positional=True)
    mean_p, mean_f = good_p.mean(0, keepdim=True), good_f.mean(0, keepdim=True)
    floor_p = 0.1 * mean_p.mean()
    assert torch.allclose(scale.mean_pixel, mean_p.clamp(min=floor_p))
    assert scale.mean_pixel[0, 0, 3, 3] == pytest.approx(float(floor_p))
    assert torch.allclose(scale.mean_feature, mean_f.clamp(min=0.1 * mean_f.mean()))
    assert scale.max_pixel == pytest.approx(float((good_p / scale.mean_pixel).max()))
    assert scale.max_feature == pytest.approx(float((good_f / scale.mean_feature).max()))
    dp, df = good_p[:2].clone(), good_f[:2].clone()
    dp[1, 0, 5, 5] += 0.5  # a defect inside, smaller than the border's residual
    d = combine(dp, df, v=1.0, normalization="positional", scale=scale)
    brute = (scale.max_feature / scale.max_pixel) * dp / scale.mean_pixel + df / scale.mean_feature
    assert torch.allclose(d, brute)
    assert torch.allclose(d[1:], combine(dp[1:], df[1:], v=1.0, normalization="positional", scale=scale))
    assert dp[1].argmax() // 8 == 0  # the raw residual peaks on the top row,
    assert (d[1] - df[1] / scale.mean_feature[0]).argmax() == 5 * 8 + 5  # the positional one at the defect
    plain = ScoreScale.from_distances(good_p, good_f)
    assert not plain.positional and plain.max_pixel == pytest.approx(float(good_p.max()))
    with pytest.raises(ValueError, match="calibrate again"):
        combine(dp, df, 1.0, normalization="positional", scale=plain)
    with pytest.raises(ValueError, match="calibrate again"):
        combine(dp, df, 1.0, normalization="calibrated", scale=scale)
    with pytest.raises(ValueError, match="image size"):
        combine(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), 1.0, normalization="positional", scale=scale)


def test_distances():
    x0 = torch.zeros(1, 3, 4, 4)
    y = torch.zeros(1, 3, 4, 4)
    y[0, 0, 1, 1] = 0.9
    assert pixel_distance(x0, y)[0, 0, 1, 1].item() == pytest.approx(0.3)
    f = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    same = feature_distance(f, f, (8, 8))
    assert same.shape == (2, 1, 8, 8) and same.abs().max() < 1e-5
    other = feature_distance(f, [-t for t in f], (8, 8))
    assert torch.allclose(other, torch.full_like(other, 4.0), atol=1e-5)  # 2 stages x (1 - (-1))


def test_anomaly_map_modes_and_crop_score():
    dp, df = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    m = anomaly_map(dp, None, ScoringConfig(mode="pixel", sigma=0))
    assert torch.equal(m, dp)
    m = anomaly_map(None, df, ScoringConfig(mode="feature", sigma=0))
    assert torch.equal(m, df)
    m = torch.zeros(1, 1, 16, 16)
    m[0, 0, 0, 0] = 5.0  # outside the centre crop
    m[0, 0, 8, 8] = 1.0
    assert image_scores(m, 1.0).item() == 5.0 and image_scores(m, 0.875).item() == 1.0
