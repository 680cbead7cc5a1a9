"""The DDAD detector: reconstruct (Alg. 1), compare (Eq. 8-9), score.

:class:`Detector` holds the trained UNet, the schedule and (unless scoring is pixel-only) the
feature extractor, and turns a batch of images into one typed :class:`DetectionResult`. It runs under
``torch.inference_mode``; the input's features are computed once per image.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .backbones import BACKBONES, FeatureExtractor, create_backbone
from .diffusion.sampler import SamplerConfig, conditioned_denoise
from .diffusion.schedule import ScheduleConfig, alphas_cumprod
from .diffusion.unet import UNet
from .runtime import PRECISIONS, autocast
from .scoring import (ScoreScale, ScoringConfig, anomaly_map, crop, feature_distance, image_scores,
                      pixel_distance, resize_for_features)


CPU_CHUNK_PIXELS = 64 * 64 * 16


@dataclass(frozen=True)
class DetectConfig:
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    backbone: str = "wide_resnet101_2"
    backbone_weights: str | None = None  # file path, folder, or "random"; None: torch hub cache
    allow_download: bool = False
    crop: float = 0.875  # centre crop of map and mask for evaluation (224 of 256)
    batch_size: int = 16
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    adapted: bool = True  # use the run's domain-adapted extractor when it has one
    adapted_epoch: int | None = None  # which adaptation epoch (None: the last)
    backend: str = "torch"  # torch | onnxruntime (graphs from `ddad export`)
    channels_last: bool = False  # NHWC memory layout for the networks
    compile: bool = False  # torch.compile the UNet and the extractor (the first batch pays the compile time)
    # Run the UNet on chunks of this many images (0: the whole batch; None: automatic, i.e. on the CPU
    # chunks of about 64 x 64 x 16 pixels, which stay in cache: at 256 px batch 16 is 1.7x slower per
    # image than batch 1; on a GPU the whole batch).
    micro_batch: int | None = None
    checkpoint: str | None = None  # which checkpoint of the run (a file name in checkpoints/ or a path); None: latest
    weights: str = "ema"  # ema: the moving average of the weights where training kept one | raw
    force_timestep: bool = False  # allow a T' above the largest timestep the model was trained on

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if not 0 < self.crop <= 1:
            raise ValueError(f"crop must be in (0, 1], got {self.crop}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch is not None and self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0, got {self.micro_batch}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.weights not in ("ema", "raw"):
            raise ValueError(f"weights must be 'ema' or 'raw', got {self.weights!r}")
        if self.backend not in ("torch", "onnxruntime"):
            raise ValueError(f"backend must be torch or onnxruntime, got {self.backend!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DetectionResult:
    """One batch's output; every tensor is on the CPU, indexed like the input batch."""

    score: torch.Tensor  # (B,) image anomaly score: max of the (cropped) map
    anomaly_map: torch.Tensor  # (B, 1, H, W) smoothed map, full size
    reconstruction: torch.Tensor  # (B, C, H, W) x0 in [-1, 1]
    pixel_distance: torch.Tensor  # (B, 1, H, W) D_p before combination
    feature_distance: torch.Tensor | None  # (B, 1, H, W) D_f, None for pixel-only scoring


def image_seed(image: torch.Tensor, seed: int) -> int:
    """A per-image noise seed from the image's content and the run seed: the same image gets the same
    noise in ``ddad test`` and ``ddad predict``, alone or in any batch."""
    digest = hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8,
                             key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Detector:
    def __init__(
        self,
        unet: UNet | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        config: DetectConfig,
        schedule: ScheduleConfig = ScheduleConfig(),
        extractor: FeatureExtractor | None = None,
        device: torch.device | str = "cpu",
        score_scale: ScoreScale | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.config = config
        # Eq. 9's constants for calibrated or positional normalisation (set by calibrate(), or given).
        self.score_scale = score_scale
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        if isinstance(unet, torch.nn.Module):
            unet = unet.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)
            if config.compile:
                unet = self._compiled(unet)
        self.unet = unet
        self.table = alphas_cumprod(schedule).to(self.device, torch.float32)
        if config.sampler.start_step >= schedule.num_timesteps:
            raise ValueError(f"start_step {config.sampler.start_step} must be below T={schedule.num_timesteps}")
        if config.scoring.uses_features:
            if extractor is None:
                extractor = create_backbone(config.backbone, config.scoring.feature_layers,
                                            config.backbone_weights, config.allow_download)
            extractor = extractor.to(self.device).eval().requires_grad_(False)
            if isinstance(extractor, torch.nn.Module) and config.channels_last:
                extractor = extractor.to(memory_format=torch.channels_last)
            if isinstance(extractor, torch.nn.Module) and config.compile:
                extractor = self._compiled(extractor)
            self.extractor: FeatureExtractor | None = extractor
        else:
            self.extractor = None

    def _compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """``torch.compile`` for inference. On the CPU, freezing lets inductor fold the frozen weights into
        the graph and prepack them for oneDNN's convolutions."""
        options = {"freezing": True} if self.device.type == "cpu" else None
        return torch.compile(module, dynamic=False, options=options)

    def _denoiser(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xt = xt.contiguous(memory_format=self.memory_format)
        k = self.config.micro_batch
        if k is None:
            k = max(1, CPU_CHUNK_PIXELS // (xt.shape[-1] * xt.shape[-2])) if self.device.type == "cpu" else 0
        with autocast(self.device, self.config.precision):
            if k <= 0 or k >= xt.shape[0]:
                return self.unet(xt, t)
            return torch.cat([self.unet(xt[i:i + k], t[i:i + k]) for i in range(0, xt.shape[0], k)])

    def seeds_for(self, images: torch.Tensor) -> list[int]:
        return [image_seed(img, self.config.seed) for img in images]

    def reconstruct(self, images: torch.Tensor, seeds: list[int] | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
        """x0 of Algorithm 1 for ``images`` conditioned on ``target`` (default: the images)."""
        x = images.to(self.device, torch.float32)
        y = x if target is None else target.to(self.device, torch.float32)
        seeds = self.seeds_for(images) if seeds is None else seeds
        with torch.inference_mode():
            return conditioned_denoise(self._denoiser, x, y, self.table, self.config.sampler, seeds)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        assert self.extractor is not None
        with torch.inference_mode(), autocast(self.device, self.config.precision):
            return [f.float() for f in self.extractor(images.to(self.device, torch.float32),
                                                       self.config.scoring.feature_layers)]

    def distances(self, reconstruction: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(D_p, D_f) between x0 and y; D_f is None for pixel-only scoring."""
        y = images.to(self.device, torch.float32)
        x0 = reconstruction.to(self.device, torch.float32)
        with torch.inference_mode():
            d_p = pixel_distance(x0, y)
            d_f = None
            if self.extractor is not None:
                # Both images go through phi in one batch.
                feats = self.features(resize_for_features(torch.cat([x0, y]), self.config.scoring.feature_size))
                n = y.shape[0]
                d_f = feature_distance([f[:n] for f in feats], [f[n:] for f in feats], tuple(y.shape[-2:]),
                                       self.config.scoring.patch_size)
        return d_p, d_f

    def calibrate(self, good_images: torch.Tensor, progress: Callable[[int], None] | None = None) -> ScoreScale:
        """Set Eq. 9's maxima (and, for positional normalisation, the per-pixel mean distances) from
        defect-free images, batch by batch, and return them. Needed once before combined scoring with
        calibrated or positional normalisation."""
        if self.extractor is None:
            raise ValueError("calibration needs feature-wise distances; this detector scores pixel-wise only")
        bs = self.config.batch_size
        d_ps, d_fs = [], []
        for i in range(0, len(good_images), bs):
            y = good_images[i:i + bs]
            d_p, d_f = self.distances(self.reconstruct(y), y)
            d_ps.append(d_p.cpu())
            d_fs.append(d_f.cpu())
            if progress is not None:
                progress(len(y))
        if not d_ps:
            raise ValueError("calibration needs at least one defect-free image")
        self.score_scale = ScoreScale.from_distances(torch.cat(d_ps), torch.cat(d_fs),
                                                     positional=self.config.scoring.normalization == "positional")
        return self.score_scale

    def __call__(self, images: torch.Tensor, seeds: list[int] | None = None) -> DetectionResult:
        return self.score(images, self.reconstruct(images, seeds))

    def score(self, images: torch.Tensor, reconstruction: torch.Tensor) -> DetectionResult:
        """Compare images with given reconstructions (Eq. 8-9): no diffusion is run."""
        if self.config.scoring.needs_calibration and self.score_scale is None:
            raise RuntimeError("combined scoring with calibrated normalisation needs Eq. 9's maxima from defect-free "
                               "images: call Detector.calibrate(good_images) first (ddad's run commands do it from "
                               "the training images), or set scoring.normalization to 'image'")
        x0 = reconstruction.to(self.device, torch.float32)
        d_p, d_f = self.distances(x0, images)
        with torch.inference_mode():
            maps = anomaly_map(d_p, d_f, self.config.scoring, self.score_scale)
            scores = image_scores(maps, self.config.crop)
        return DetectionResult(
            score=scores.cpu(), anomaly_map=maps.cpu(), reconstruction=x0.cpu(),
            pixel_distance=d_p.cpu(), feature_distance=None if d_f is None else d_f.cpu(),
        )


__all__ = ["DetectConfig", "DetectionResult", "Detector", "crop", "image_seed"]
