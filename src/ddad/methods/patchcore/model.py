"""PatchCore's detector: locally aware patch features (paper Sec. 3.1), nearest-neighbour distances to the
memory bank of the image's category (Sec. 3.3), the map upsampled and smoothed, its maximum the score.

    phi(x)   = concat over stages l of  up( avg_{p x p}( f_l(x) ) )          (B, D, h, w) on stage 1's grid
    s(x)_ij  = min_{m in M_c} || phi(x)_ij - m ||_2                          M_c: the bank of x's category
    map      = G_sigma * bilinear_up(s(x))                                   score = max of the (cropped) map
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ...backbones import FeatureExtractor
from ...engine.trainer import as_float_images
from ...memory_bank import nearest_by_category
from ...results import AnomalyResult
from ...scoring import gaussian_blur, image_scores, local_average, resize_for_features
from .settings import PatchCoreDetect, PatchFeatures

def features_of_stages(stages: Sequence[torch.Tensor], features: PatchFeatures) -> torch.Tensor:
    """(B, D, h, w) from the backbone's stages: each averaged over p x p neighbourhoods, upsampled (bilinear) to
    the first stage's grid, concatenated on channels."""
    stages = [local_average(f.float(), features.patch_size) for f in stages]
    size = stages[0].shape[-2:]
    return torch.cat([stages[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                    for f in stages[1:]], dim=1)


def compute_patch_features(extractor: FeatureExtractor, images: torch.Tensor, features: PatchFeatures) -> torch.Tensor:
    """(B, D, h, w): :func:`features_of_stages` of ``features.layers`` for images resized to ``features.input_size``
    (:func:`patch_features` without autograd; this one is traced by the export)."""
    x = resize_for_features(as_float_images(images), features.input_size)
    return features_of_stages(extractor(x, features.layers), features)


patch_features = torch.inference_mode()(compute_patch_features)


def distance_map(grid: torch.Tensor, size: tuple[int, int], detect: PatchCoreDetect) -> tuple[torch.Tensor, torch.Tensor]:
    """(map, score) of patch distances ``grid`` (B, 1, h, w): upsampled (bilinear) to the image ``size``,
    smoothed, its (cropped) maximum the score."""
    maps = gaussian_blur(F.interpolate(grid, size=size, mode="bilinear", align_corners=False), detect.sigma)
    return maps, image_scores(maps, detect.crop)


class PatchCoreDetector:
    """Images (B, C, H, W) in [-1, 1] -> :class:`AnomalyResult`. Each image is compared with the bank of
    its category when it is known and has one; the one bank of a unified run otherwise; and with every bank
    (the nearest patch of any category) when the category is unknown."""

    def __init__(self, extractor: FeatureExtractor, banks: Mapping[str, torch.Tensor], features: PatchFeatures,
                 detect: PatchCoreDetect, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.extractor = extractor.to(self.device).eval().requires_grad_(False)
        self.banks = {name: bank.float().to(self.device) for name, bank in banks.items()}
        self.features, self.detect = features, detect

    def distances(self, images: torch.Tensor, categories: Sequence[str | None] | None = None) -> torch.Tensor:
        """(B, 1, h, w): each patch's distance to the nearest patch of its image's bank(s)."""
        feats = patch_features(self.extractor, images.to(self.device), self.features)
        return nearest_by_category(feats, self.banks, categories).cpu()

    def __call__(self, images: torch.Tensor, categories: Sequence[str | None] | None = None) -> AnomalyResult:
        grid = self.distances(images, categories)
        maps, scores = distance_map(grid, tuple(images.shape[-2:]), self.detect)
        return AnomalyResult(score=scores.cpu(), anomaly_map=maps.cpu(), extras={"patch_distance": grid.cpu()})
