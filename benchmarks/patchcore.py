"""PatchCore (Roth et al. 2022), the baseline users would pick instead, written for side-by-side runs.

Locally aware patch features from two backbone stages (3 x 3 average, the deeper stage upsampled to
the shallower one's grid, concatenated), a memory bank of the training patches reduced by greedy
k-center coreset selection (on a random projection, as the paper), and nearest-neighbour patch
distances as the anomaly map, upsampled to the image, smoothed with the same Gaussian as ddad and
scored with the same metrics code. The features, coreset and distances are those of ddad's PatchCore
method (``--method patchcore``, :mod:`ddad.memory_bank`); this script runs them on image tensors for the
side-by-side benchmarks. Rows measured before 2026-12-03 came from this script's own copy (the same
algorithm; its coreset projected even where D <= 128 and drew the first pick after the projection).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddad.backbones import FeatureExtractor
from ddad.memory_bank import as_patches, coreset_size, greedy_coreset, nearest_distances
from ddad.methods.patchcore import model
from ddad.methods.patchcore.settings import PatchFeatures
from ddad.scoring import gaussian_blur, image_scores


@dataclass
class PatchCoreResult:
    scores: torch.Tensor
    maps: torch.Tensor
    fit_seconds: float
    predict_seconds_per_image: float
    bank_size: int


def patch_features(extractor: FeatureExtractor, images: torch.Tensor, layers=(2, 3), batch: int = 32,
                   input_size: int | None = None) -> torch.Tensor:
    """(N, D, h, w) locally aware features on the grid of the first stage (ddad's PatchCore method's)."""
    settings = PatchFeatures(backbone=extractor.name, layers=tuple(layers), input_size=input_size)
    return torch.cat([model.patch_features(extractor, images[i:i + batch], settings)
                      for i in range(0, len(images), batch)])


def fit_bank(extractor: FeatureExtractor, train: torch.Tensor, fraction: float = 0.1, layers=(2, 3),
             input_size: int | None = None, presample: float = 1.0) -> torch.Tensor:
    """The memory bank: a greedy coreset of ``fraction`` of the training patches. ``presample`` < 1: chosen
    among a seeded random share of the patches only (the coreset of ddad.memory_bank needs no such cut on
    this CPU any more; kept to re-run earlier rows)."""
    bank = as_patches(patch_features(extractor, train, layers, input_size=input_size))
    if presample < 1.0:
        m = bank.shape[0]
        bank = bank[torch.randperm(m, generator=torch.Generator().manual_seed(1))[:int(presample * m)]]
        fraction = min(1.0, fraction / presample)
    k = coreset_size(len(bank), fraction)
    return bank if k == len(bank) else bank[greedy_coreset(bank, k)]


def score_with_bank(extractor: FeatureExtractor, bank: torch.Tensor, test: torch.Tensor, sigma: float = 4.0,
                    crop: float = 1.0, layers=(2, 3), input_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, maps): nearest-neighbour patch distances, upsampled and smoothed; score = max of the map."""
    tf = patch_features(extractor, test, layers, input_size=input_size)
    n, d, h, w = tf.shape
    dist = nearest_distances(as_patches(tf), bank).view(n, 1, h, w)
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
