"""DRDC's base detector: backbone features -> transformer reconstruction -> base heatmap (Eq. 2) -> score."""

from __future__ import annotations

import torch

from ...backbones import FeatureExtractor
from ...results import AnomalyResult
from ...runtime import autocast
from ...scoring import crop
from .features import token_features
from .model import FeatureReconstructor, base_heatmap, pooled_max
from .settings import DRDCDetect, FeatureConfig


class DRDCDetector:
    """Images (B, C, H, W) in [-1, 1] -> :class:`AnomalyResult`; every image is scored on its own (no batch
    statistics, nothing random)."""

    def __init__(self, extractor: FeatureExtractor, model: FeatureReconstructor, features: FeatureConfig,
                 detect: DRDCDetect, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.extractor = extractor.to(self.device).eval().requires_grad_(False)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.features, self.detect = features, detect

    def __call__(self, images: torch.Tensor) -> AnomalyResult:
        with torch.inference_mode(), autocast(self.device, self.detect.precision):
            feats = token_features(self.extractor, images.to(self.device), self.features.grid)
            recon = self.model(feats)
            maps = base_heatmap(feats, recon, tuple(images.shape[-2:]))
            scores = pooled_max(crop(maps, self.detect.crop), self.detect.pool)
        return AnomalyResult(pred_score=scores.float().cpu(), anomaly_map=maps.float().cpu(), reconstruction=None,
                             extras={"feature_error": (recon.float() - feats.float()).norm(dim=1, keepdim=True).cpu()})
