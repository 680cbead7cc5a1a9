"""Anomaly maps from an image y and its reconstruction x0 (paper Sec. 4.3, Eq. 8-9, App. 7).

    D_p = mean_c | x0 - y |                                                  (pixel-wise, L1)
    D_f = sum_{j in J} 1 - cos( phi_j(x0), phi_j(y) )  upsampled to image size      (Eq. 8)
    D   = v * max(D_f) / max(D_p) * D_p + D_f                                        (Eq. 9)

phi_j are backbone stages with each feature map locally averaged (3 x 3, as PatchCore); J = {2, 3}.
Eq. 9 gives D_p "the same upper bound" as D_f. Where the maxima come from (``normalization``):

- ``calibrated``: over defect-free calibration images, once (:class:`ScoreScale`). Fixed
  constants, so an image's map never depends on the rest of its batch, and the pixel term keeps its
  magnitude from image to image.
- ``image``: per image. Also batch-independent, but every image's D_p is stretched to the same peak, so
  the pixel term no longer says how large an image's residual is.
- ``positional`` (default): as ``calibrated``, after dividing D_p and D_f at each pixel by their mean over the
  calibration images there (floored at a tenth of the map's mean). The map then says how much larger
  than a defect-free image's a residual is *at that place*: borders, where every reconstruction is
  worse, stop producing the highest scores of good images, and fixed-camera data gets a per-position
  background model (BENCHMARKS.md, issue 8 fourth round, has what it changes).
- ``batch``: over the batch being scored, as the authors' code does (a score then depends on the other
  images in its batch); for comparison only.

Finally the map is smoothed with a Gaussian of sigma 4 (App. 7).

Eq. 8's reference (``reference``): the reconstruction's features phi_j(x0) (the paper), or ``bank``: for
each stage, the nearest (by cosine) of the training images' locally aware patches of that stage, a coreset
of ``bank_fraction`` of them (PatchCore's memory bank, with Eq. 8's distance):

    D_f = sum_{j in J} min_m 1 - cos( phi_j(y), b_{j,m} )  upsampled to image size    (Eq. 8, bank)

The pixel term still measures y against the diffusion reconstruction x0, so Eq. 9 fuses a nearest-neighbour
feature map with the diffusion's pixel map. A bank holds its training images' patches, so Eq. 9's maxima
then come from held-out (validation) images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from .memory_bank import as_patches, nearest_distances

SCORING_MODES = ("combined", "pixel", "feature")
REFERENCES = ("reconstruction", "bank")  # what Eq. 8 compares phi(y) with
NORMALIZATIONS = ("calibrated", "positional", "image", "batch")
CALIBRATED_NORMALIZATIONS = ("calibrated", "positional")  # those that need a ScoreScale
MEAN_FLOOR = 0.1  # positional: the per-pixel means are at least this fraction of their average


@dataclass(frozen=True)
class ScoringConfig:
    mode: str = "combined"  # combined | pixel | feature
    v: float = 1.0
    feature_layers: tuple[int, ...] = (2, 3)
    patch_size: int = 3
    sigma: float = 4.0
    normalization: str = "positional"  # where Eq. 9's maxima come from: positional | calibrated | image | batch
    calibration_images: int = 64  # defect-free training images that set the calibrated maxima
    # The backbone sees x0 and y resized to this many pixels a side (None: as they are). Small images
    # (64 px) give ImageNet backbones too coarse a grid; D_f comes back at the image size either way.
    feature_size: int | None = None
    reference: str = "reconstruction"  # Eq. 8 against phi(x0), or the nearest training patch of a bank
    bank_fraction: float = 0.1  # reference "bank": the coreset's share of the training patches

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"scoring reference must be one of {REFERENCES}, got {self.reference!r}")
        if not 0 < self.bank_fraction <= 1:
            raise ValueError(f"bank_fraction must be in (0, 1], got {self.bank_fraction}")
        if self.mode not in SCORING_MODES:
            raise ValueError(f"scoring mode must be one of {SCORING_MODES}, got {self.mode!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.calibration_images < 1:
            raise ValueError(f"calibration_images must be >= 1, got {self.calibration_images}")
        if self.v < 0:
            raise ValueError(f"v must be >= 0, got {self.v}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd and >= 1, got {self.patch_size}")
        if self.feature_size is not None and self.feature_size < 16:
            raise ValueError(f"feature_size must be >= 16 (or null), got {self.feature_size}")
        if not self.feature_layers or min(self.feature_layers) < 1 or max(self.feature_layers) > 4:
            raise ValueError(f"feature_layers must be within 1..4, got {self.feature_layers}")

    @property
    def uses_features(self) -> bool:
        return self.mode != "pixel"

    @property
    def needs_calibration(self) -> bool:
        """Combined scoring with calibrated (or positional) maxima needs a :class:`ScoreScale` first."""
        return self.mode == "combined" and self.normalization in CALIBRATED_NORMALIZATIONS

    def to_dict(self) -> dict:
        return asdict(self)

    def distance_settings(self) -> "ScoringConfig":
        """These settings as far as D_p and D_f (and so a :class:`ScoreScale`) depend on them: ``mode``, ``v``
        and ``sigma`` only combine and smooth the distances, so they are reset to their defaults here (a
        scale calibrated once serves every v and sigma)."""
        return replace(self, mode=ScoringConfig.mode, v=ScoringConfig.v, sigma=ScoringConfig.sigma)


@dataclass(frozen=True)
class ScoreScale:
    """Eq. 9's normalisation constants from defect-free calibration images: the maxima of D_p and D_f,
    and for ``positional`` normalisation the per-pixel means (1, 1, H, W) they were divided by first (the
    maxima are then those of the divided maps)."""

    max_pixel: float
    max_feature: float
    n_images: int
    mean_pixel: torch.Tensor | None = None
    mean_feature: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not (self.max_pixel > 0 and self.max_feature > 0):
            raise ValueError(f"calibration maxima must be positive, got D_p {self.max_pixel}, D_f {self.max_feature}")
        if (self.mean_pixel is None) != (self.mean_feature is None):
            raise ValueError("positional calibration needs both mean maps (D_p and D_f)")

    @property
    def positional(self) -> bool:
        return self.mean_pixel is not None

    @classmethod
    def from_distances(cls, d_pixel: torch.Tensor, d_feature: torch.Tensor, positional: bool = False) -> "ScoreScale":
        """The scale of defect-free images' D_p and D_f, (N, 1, H, W) each."""
        if not positional:
            return cls(float(d_pixel.amax()), float(d_feature.amax()), len(d_pixel))
        mean_p, mean_f = floored_mean(d_pixel), floored_mean(d_feature)
        return cls(float((d_pixel / mean_p).amax()), float((d_feature / mean_f).amax()), len(d_pixel),
                   mean_p.cpu(), mean_f.cpu())

    def to_dict(self) -> dict:
        """The scalars (the mean maps are stored apart, see :meth:`maps`)."""
        return {"max_pixel": self.max_pixel, "max_feature": self.max_feature, "n_images": self.n_images,
                "positional": self.positional}

    def maps(self) -> dict[str, torch.Tensor]:
        return {} if not self.positional else {"mean_pixel": self.mean_pixel, "mean_feature": self.mean_feature}


def floored_mean(maps: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean of (N, 1, H, W) maps, floored at MEAN_FLOOR times its average (no division by ~0)."""
    mean = maps.float().mean(dim=0, keepdim=True)
    return mean.clamp(min=MEAN_FLOOR * float(mean.mean()) + torch.finfo(torch.float32).tiny)


def pixel_distance(x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """D_p: (B, 1, H, W) mean absolute difference over channels."""
    return (x0.float() - y.float()).abs().mean(dim=1, keepdim=True)


def local_average(feature: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Aggregate each position's p x p neighbourhood (PatchCore's locally aware features)."""
    if patch_size == 1:
        return feature
    return F.avg_pool2d(feature, patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)


def resize_for_features(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """``images`` bilinearly resized to ``size`` x ``size`` for the backbone (unchanged for None)."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def feature_distance(
    feats_x0: Sequence[torch.Tensor], feats_y: Sequence[torch.Tensor], size: tuple[int, int], patch_size: int = 3
) -> torch.Tensor:
    """D_f (Eq. 8): sum over stages of 1 - cosine similarity, each upsampled to ``size``."""
    total = None
    for fx, fy in zip(feats_x0, feats_y, strict=True):
        cos = F.cosine_similarity(local_average(fx.float(), patch_size), local_average(fy.float(), patch_size), dim=1)
        d = F.interpolate((1.0 - cos)[:, None], size=size, mode="bilinear", align_corners=False)
        total = d if total is None else total + d
    assert total is not None, "at least one feature stage is needed"
    return total


def reference_patches(feats: Sequence[torch.Tensor], patch_size: int = 3) -> list[torch.Tensor]:
    """Each stage's locally aware features as unit-length patches (M, C_j): what a bank of Eq. 8 holds."""
    return [F.normalize(as_patches(local_average(f.float(), patch_size)), dim=1) for f in feats]


def bank_feature_distance(feats_y: Sequence[torch.Tensor], banks: Sequence[torch.Tensor], size: tuple[int, int],
                          patch_size: int = 3) -> torch.Tensor:
    """D_f (Eq. 8, bank): per stage, 1 - cos to the nearest unit-length bank patch (|a - b|^2 / 2 for unit
    vectors, so the nearest by Euclidean distance is the nearest by cosine), upsampled to ``size``, summed."""
    total = None
    for fy, bank in zip(feats_y, banks, strict=True):
        b, _, h, w = fy.shape
        queries = reference_patches([fy], patch_size)[0]
        nearest = nearest_distances(queries, bank.to(queries.device)).to(queries.device)
        d = F.interpolate((0.5 * nearest.square()).view(b, 1, h, w), size=size, mode="bilinear", align_corners=False)
        total = d if total is None else total + d
    assert total is not None, "at least one feature stage is needed"
    return total


def combine(d_pixel: torch.Tensor, d_feature: torch.Tensor, v: float, normalization: str = "image",
            scale: ScoreScale | None = None) -> torch.Tensor:
    """Eq. 9: D = v * max(D_f) / max(D_p) * D_p + D_f, the maxima from ``scale`` (calibrated; positional
    divides D_p and D_f by the scale's per-pixel means first), per image (image) or over the batch (batch)."""
    if normalization in CALIBRATED_NORMALIZATIONS:
        if scale is None:
            raise ValueError(f"{normalization} normalisation (Eq. 9) needs a ScoreScale: the maxima of D_p and D_f "
                             "on defect-free images (Detector.calibrate)")
        if (normalization == "positional") != scale.positional:
            raise ValueError(f"{normalization} normalisation needs a scale calibrated for it; this one is "
                             f"{'positional' if scale.positional else 'calibrated'}: calibrate again")
        if scale.positional:
            if scale.mean_pixel.shape[-2:] != d_pixel.shape[-2:]:
                raise ValueError(f"positional calibration was made at {tuple(scale.mean_pixel.shape[-2:])} pixels, "
                                 f"the maps are {tuple(d_pixel.shape[-2:])}: calibrate at this image size")
            d_pixel = d_pixel / scale.mean_pixel.to(d_pixel.device)
            d_feature = d_feature / scale.mean_feature.to(d_feature.device)
        return (v * scale.max_feature / scale.max_pixel) * d_pixel + d_feature
    if normalization == "batch":
        max_f, max_p = d_feature.amax(), d_pixel.amax()
    elif normalization == "image":
        max_f = d_feature.amax(dim=(1, 2, 3), keepdim=True)
        max_p = d_pixel.amax(dim=(1, 2, 3), keepdim=True)
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    factor = v * max_f / max_p.clamp(min=torch.finfo(d_pixel.dtype).tiny)
    return factor * d_pixel + d_feature


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, 1, H, W) maps, reflecting at the border
    (scipy.ndimage.gaussian_filter with mode='reflect', truncate=4)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps.device)
    r = k.numel() // 2
    h, w = maps.shape[-2:]
    out = maps.float()
    # 'symmetric' reflection (edge pixel repeated) as scipy's 'reflect'; tile if the radius exceeds the size.
    out = _pad_symmetric(out, r, dim=-1)
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    out = _pad_symmetric(out, r, dim=-2)
    out = F.conv2d(out, k.view(1, 1, -1, 1))
    assert out.shape[-2:] == (h, w)
    return out


def _pad_symmetric(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    period = 2 * n
    idx = torch.arange(-r, n + r, device=x.device) % period
    idx = torch.where(idx >= n, period - 1 - idx, idx)
    return x.index_select(dim, idx)


def anomaly_map(
    d_pixel: torch.Tensor | None, d_feature: torch.Tensor | None, config: ScoringConfig,
    scale: ScoreScale | None = None,
) -> torch.Tensor:
    """The smoothed anomaly map for ``config.mode`` from precomputed distances (``scale``: the calibrated
    maxima, needed for combined scoring with calibrated normalisation)."""
    if config.mode == "pixel":
        assert d_pixel is not None
        raw = d_pixel
    elif config.mode == "feature":
        assert d_feature is not None
        raw = d_feature
    else:
        assert d_pixel is not None and d_feature is not None
        raw = combine(d_pixel, d_feature, config.v, config.normalization, scale)
    return gaussian_blur(raw, config.sigma)


def center_crop_box(size: tuple[int, int], fraction: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centred crop keeping ``fraction`` of each side
    (224 of 256 for 0.875, as the paper evaluates)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
    h, w = size
    ch, cw = max(1, int(round(h * fraction))), max(1, int(round(w * fraction)))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def crop(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    top, left, ch, cw = center_crop_box(tuple(maps.shape[-2:]), fraction)
    return maps[..., top:top + ch, left:left + cw]


def image_scores(maps: torch.Tensor, crop_fraction: float = 1.0) -> torch.Tensor:
    """Image score: the maximum of the (cropped) anomaly map."""
    return crop(maps, crop_fraction).flatten(1).amax(dim=1)

