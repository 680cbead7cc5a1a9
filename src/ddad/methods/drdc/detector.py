"""DRDC's detector: backbone features -> transformer reconstruction -> base heatmap (Eq. 2); with the
refinement, the diffusion heatmap (Eq. 9, 14-16) fused with it (Eq. 17) -> score."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ...backbones import FeatureExtractor
from ...diffusion.sampler import image_seed
from ...results import AnomalyResult
from ...runtime import autocast
from ...scoring import ScoreScale, crop
from .features import token_features
from .fusion import fuse, multiscale
from .model import FeatureReconstructor, TokenBank, base_heatmap, pooled_max
from .refiner import Refiner, resized
from .settings import DRDCDetect, FeatureConfig


def base_map(error: torch.Tensor, size: tuple[int, int], detect: DRDCDetect) -> torch.Tensor:
    """The base heatmap at the image ``size`` from the base model's error on the token grid (Eq. 2), averaged
    over ``detect.scales`` where ``multiscale_base`` asks."""
    base = base_heatmap(error, size)
    return multiscale(base, detect.scales) if detect.multiscale_base else base


def image_score(fused: torch.Tensor, detect: DRDCDetect) -> torch.Tensor:
    """The image score: the maximum of the (cropped) map after ``detect.pool`` average pooling."""
    return pooled_max(crop(fused, detect.crop), detect.pool)


class DRDCDetector:
    """Images (B, C, H, W) in [-1, 1] -> :class:`AnomalyResult`; every image is scored on its own (no batch
    statistics; the refinement's draws are seeded per image).

    With a ``refiner``, both maps are divided by their maxima on defect-free calibration images
    (``scale``: ``max_pixel`` the diffusion map's, ``max_feature`` the base map's) before Eq. 17."""

    def __init__(self, extractor: FeatureExtractor, model: FeatureReconstructor | TokenBank, features: FeatureConfig,
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

    def maps(self, images: torch.Tensor, categories: Sequence[str | None] | None = None) -> dict[str, torch.Tensor]:
        """The unscaled maps at the images' size: ``base`` (B, 1, H, W), and with the refiner ``diffusion``
        and the ``inpainted`` image; ``feature_error`` on the token grid. ``categories``: the images' (a
        memory-bank base with a bank per category compares each with its own)."""
        size = tuple(images.shape[-2:])
        with torch.inference_mode(), autocast(self.device, self.detect.precision):
            feats = token_features(self.extractor, images.to(self.device), self.features.grid)
            error = self.model.error(feats, categories).float()
        out = {"base": base_map(error, size, self.detect), "feature_error": error}
        if self.refiner is not None:
            with torch.inference_mode():
                seeds = [image_seed(img, self.detect.seed) for img in images]
                refined = self.refiner(resized(images.to(self.device), self.refiner.refine.image_size), seeds)
            out["diffusion"] = F.interpolate(refined.heatmap, size=size, mode="bilinear", align_corners=False)
            out["inpainted"] = resized(refined.inpainted, size[0]).clamp(-1, 1)
        return out

    def calibrate(self, images: torch.Tensor, categories: Sequence[str | None] | None = None,
                  batch_size: int = 16, progress: bool = False) -> ScoreScale:
        """The two maps' maxima on defect-free ``images`` (the scale of Eq. 17's inputs)."""
        from tqdm.auto import tqdm

        categories = list(categories) if categories is not None else [None] * len(images)
        bar = tqdm(total=len(images), desc="calibrate (Eq. 17's scale)", unit="img", disable=not progress,
                   dynamic_ncols=True)
        maps = []
        for i in range(0, len(images), batch_size):
            maps.append(self.maps(images[i:i + batch_size], categories[i:i + batch_size]))
            bar.update(len(maps[-1]["base"]))
        bar.close()
        return ScoreScale.from_distances(torch.cat([m["diffusion"] for m in maps]), torch.cat([m["base"] for m in maps]))

    def __call__(self, images: torch.Tensor, categories: Sequence[str | None] | None = None) -> AnomalyResult:
        return self.score_maps(self.maps(images, categories))

    def score_maps(self, maps: dict[str, torch.Tensor]) -> AnomalyResult:
        """The fused map (Eq. 17) and the pooled image score from the unscaled :meth:`maps` of a batch."""
        maps = {k: v.to(self.device) for k, v in maps.items()}
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
        scores = image_score(fused, self.detect)
        return AnomalyResult(score=scores.float().cpu(), anomaly_map=fused.float().cpu(),
                             reconstruction=None if self.refiner is None else maps["inpainted"].cpu(), extras=extras)


# The unscaled maps of the last two splits scored (a test scores the validation split, then the test split),
# by the maps' calibration key and the split's images: alpha, the pooling and the crop only re-weigh them, so
# ``ddad tune`` runs the diffusion once per map setting and a second test with another alpha none. Kept for
# splits of up to CACHED_SPLIT_IMAGES images (a larger split's maps would double the memory its result takes).
CACHED_SPLIT_IMAGES = 1024
CACHED_SPLITS = 2
_last_maps: dict[tuple, dict[str, torch.Tensor]] = {}


def score_split(detector: DRDCDetector, split, batch_size: int, maps_key: str, cache: bool = True,
                progress: bool = True) -> AnomalyResult:
    """Every image of ``split`` scored once, its maps taken from the last split's where the maps' key and
    the images are the same."""
    from tqdm.auto import tqdm

    key = (maps_key, tuple(str(s.image) for s in split.samples))
    maps = _last_maps.get(key) if cache else None
    if maps is None:
        bar = tqdm(total=len(split.images), desc="detect", unit="img", disable=not progress, dynamic_ncols=True)
        parts = []
        categories = [s.category for s in split.samples]
        for start in range(0, len(split.images), batch_size):
            end = start + batch_size
            parts.append({k: v.cpu() for k, v in detector.maps(split.images[start:end], categories[start:end]).items()})
            bar.update(len(parts[-1]["base"]))
        bar.close()
        maps = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if cache and len(split.images) <= CACHED_SPLIT_IMAGES:
            while len(_last_maps) >= CACHED_SPLITS:
                _last_maps.pop(next(iter(_last_maps)))  # the oldest
            _last_maps[key] = maps
    return AnomalyResult.concat([detector.score_maps({k: v[i:i + batch_size] for k, v in maps.items()})
                                 for i in range(0, len(split.images), batch_size)])
