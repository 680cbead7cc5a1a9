"""PatchCore (Roth et al. 2022), the baseline users would pick instead, written for side-by-side runs.

Locally aware patch features from two backbone stages (3 x 3 average, the deeper stage upsampled to
the shallower one's grid, concatenated), a memory bank of the training patches reduced by greedy
k-center coreset selection (on a random projection, as the paper), and nearest-neighbour patch
distances as the anomaly map, upsampled to the image, smoothed with the same Gaussian as ddad and
scored with the same metrics code. Kept out of the package: it is a benchmark baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddad.backbones import FeatureExtractor
from ddad.scoring import gaussian_blur, image_scores, local_average, resize_for_features


@dataclass
class PatchCoreResult:
    scores: torch.Tensor
    maps: torch.Tensor
    fit_seconds: float
    predict_seconds_per_image: float
    bank_size: int


def patch_features(extractor: FeatureExtractor, images: torch.Tensor, layers=(2, 3), batch: int = 32) -> torch.Tensor:
    """(N, D, h, w) locally aware features on the grid of the first stage."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            feats = [local_average(f, 3) for f in extractor(images[i:i + batch], layers)]
            size = feats[0].shape[-2:]
            feats = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
            out.append(torch.cat(feats, dim=1))
    return torch.cat(out)


def greedy_coreset(bank: torch.Tensor, fraction: float, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of a k-center greedy coreset of ``bank`` (M, D) with k = fraction * M."""
    m = bank.shape[0]
    k = max(1, int(round(fraction * m)))
    if k >= m:
        return torch.arange(m)
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(bank.shape[1], min(projection_dim, bank.shape[1]), generator=g) / projection_dim ** 0.5
    z = bank @ proj
    # squared distances through |z|^2 + |c|^2 - 2 z.c: one matrix-vector product per pick (torch.cdist
    # against a single row was ~10x slower on this CPU); the same picks as with plain distances
    sq = (z * z).sum(1)
    selected = [int(torch.randint(m, (1,), generator=g))]
    dist = (sq - 2 * (z @ z[selected[-1]]) + sq[selected[-1]]).clamp_min_(0)
    for _ in range(k - 1):
        nxt = int(dist.argmax())
        selected.append(nxt)
        torch.minimum(dist, (sq - 2 * (z @ z[nxt]) + sq[nxt]).clamp_min_(0), out=dist)
    return torch.tensor(selected)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    out = []
    for i in range(0, len(queries), chunk):
        out.append(torch.cdist(queries[i:i + chunk], bank).min(dim=1).values)
    return torch.cat(out)


def fit_bank(extractor: FeatureExtractor, train: torch.Tensor, fraction: float = 0.1, layers=(2, 3),
             input_size: int | None = None, presample: float = 1.0) -> torch.Tensor:
    """The memory bank: a greedy coreset of ``fraction`` of the training patches. ``presample`` < 1: chosen
    among a seeded random share of the patches only, for banks too large for the greedy search on a CPU."""
    feats = patch_features(extractor, resize_for_features(train, input_size), layers)
    bank = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    if presample < 1.0:
        m = bank.shape[0]
        bank = bank[torch.randperm(m, generator=torch.Generator().manual_seed(1))[:int(presample * m)]]
        fraction = min(1.0, fraction / presample)
    return bank[greedy_coreset(bank, fraction)]


def score_with_bank(extractor: FeatureExtractor, bank: torch.Tensor, test: torch.Tensor, sigma: float = 4.0,
                    crop: float = 1.0, layers=(2, 3), input_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, maps): nearest-neighbour patch distances, upsampled and smoothed; score = max of the map."""
    tf = patch_features(extractor, resize_for_features(test, input_size), layers)
    n, d, h, w = tf.shape
    dist = nearest_distance(tf.permute(0, 2, 3, 1).reshape(-1, d), bank).view(n, 1, h, w)
    maps = gaussian_blur(F.interpolate(dist, size=test.shape[-2:], mode="bilinear", align_corners=False), sigma)
    return image_scores(maps, crop), maps


def run_patchcore(extractor: FeatureExtractor, train: torch.Tensor, test: torch.Tensor, fraction: float = 0.1,
                  sigma: float = 4.0, crop: float = 1.0, layers=(2, 3), input_size: int | None = None,
                  presample: float = 1.0) -> PatchCoreResult:
    """``input_size``: the backbone sees the images resized to this size (as ddad's ``feature_size``)."""
    t0 = time.perf_counter()
    bank = fit_bank(extractor, train, fraction, layers, input_size, presample)
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, maps = score_with_bank(extractor, bank, test, sigma, crop, layers, input_size)
    per_image = (time.perf_counter() - t0) / len(test)
    return PatchCoreResult(scores, maps, fit, per_image, bank.shape[0])
