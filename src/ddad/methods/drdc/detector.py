"""DRDC's detector: backbone features -> transformer reconstruction -> base heatmap (Eq. 2); with the
refinement, the diffusion heatmap (Eq. 9, 14-16) fused with it (Eq. 17) -> score."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backbones import FeatureExtractor
from ...results import AnomalyResult
from ...runtime import autocast
from ...scoring import ScoreScale, crop
from .features import token_features
from .fusion import fuse, multiscale
from .model import FeatureReconstructor, base_heatmap, pooled_max
from .refiner import Refiner, resized
from .settings import DRDCDetect, FeatureConfig


class DRDCDetector:
    """Images (B, C, H, W) in [-1, 1] -> :class:`AnomalyResult`; every image is scored on its own (no batch
    statistics; the refinement's draws are seeded per image).

    With a ``refiner``, both maps are divided by their maxima on defect-free calibration images
    (``scale``: ``max_pixel`` the diffusion map's, ``max_feature`` the base map's) before Eq. 17."""

    def __init__(self, extractor: FeatureExtractor, model: FeatureReconstructor, features: FeatureConfig,
                 detect: DRDCDetect, device: torch.device | str = "cpu", refiner: Refiner | None = None,
                 scale: ScoreScale | None = None) -> None:
        self.device = torch.device(device)
        self.extractor = extractor.to(self.device).eval().requires_grad_(False)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.features, self.detect = features, detect
        self.refiner = refiner
        if refiner is not None:
            refiner.unet.to(self.device).eval().requires_grad_(False)
        self.scale = scale

    def maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unscaled maps at the images' size: ``base`` (B, 1, H, W), and with the refiner ``diffusion``
        and the ``inpainted`` image; ``feature_error`` on the token grid."""
        size = tuple(images.shape[-2:])
        with torch.inference_mode(), autocast(self.device, self.detect.precision):
            feats = token_features(self.extractor, images.to(self.device), self.features.grid)
            recon = self.model(feats)
            base = base_heatmap(feats, recon, size).float()
        if self.detect.multiscale_base:
            base = multiscale(base, self.detect.scales)
        out = {"base": base, "feature_error": (recon.float() - feats.float()).norm(dim=1, keepdim=True)}
        if self.refiner is not None:
            with torch.inference_mode():
                refined = self.refiner(resized(images.to(self.device), self.refiner.refine.image_size))
            out["diffusion"] = F.interpolate(refined.heatmap, size=size, mode="bilinear", align_corners=False)
            out["inpainted"] = resized(refined.inpainted, size[0]).clamp(-1, 1)
        return out

    def calibrate(self, images: torch.Tensor, batch_size: int = 16) -> ScoreScale:
        """The two maps' maxima on defect-free ``images`` (the scale of Eq. 17's inputs)."""
        maps = [self.maps(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        return ScoreScale.from_distances(torch.cat([m["diffusion"] for m in maps]), torch.cat([m["base"] for m in maps]))

    def __call__(self, images: torch.Tensor) -> AnomalyResult:
        maps = self.maps(images)
        extras = {"feature_error": maps["feature_error"].cpu()}
        if self.refiner is None:
            fused = maps["base"]
        else:
            if self.scale is None:
                raise ValueError("the DRDC detector with refinement needs its calibration scale (Eq. 17's inputs)")
            base = maps["base"] / self.scale.max_feature
            diffusion = maps["diffusion"] / self.scale.max_pixel
            fused = fuse(base, diffusion, self.detect.alpha)  # Eq. 17
            extras.update(base_map=base.cpu(), diffusion_map=diffusion.cpu())
        scores = pooled_max(crop(fused, self.detect.crop), self.detect.pool)
        return AnomalyResult(pred_score=scores.float().cpu(), anomaly_map=fused.float().cpu(),
                             reconstruction=None if self.refiner is None else maps["inpainted"].cpu(), extras=extras)
