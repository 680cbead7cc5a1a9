"""The DDAD detector: reconstruct (Alg. 1), compare (Eq. 8-9), score.

:class:`Detector` holds the trained UNet, the schedule and (unless scoring is pixel-only) the
feature extractor, and turns a batch of images into one typed :class:`ddad.results.AnomalyResult`
(with DDAD's pixel and feature distances D_p, D_f in ``extras``). It runs under ``torch.inference_mode``;
the input's features are computed once per image. Where its networks come from is the loader's business
(:mod:`ddad.methods.ddad.loading`); the device is given, never chosen here.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...backbones import FeatureExtractor
from ...diffusion.sampler import conditioned_denoise, image_seed
from ...diffusion.schedule import ScheduleConfig, alphas_cumprod
from ...diffusion.unet import UNet
from ...results import AnomalyResult
from ...runtime import RuntimeConfig, autocast
from ...scoring import (ScoreScale, anomaly_map, bank_feature_distance, feature_distance, image_scores,
                        pixel_distance, resize_for_features)
from .settings import DetectConfig


CPU_CHUNK_PIXELS = 64 * 64 * 16


class Detector:
    def __init__(
        self,
        unet: UNet | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        config: DetectConfig,
        schedule: ScheduleConfig = ScheduleConfig(),
        extractor: FeatureExtractor | None = None,
        runtime: RuntimeConfig = RuntimeConfig(),
        device: torch.device | str = "cpu",
        score_scale: ScoreScale | None = None,
        extractor_source: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.config = config
        self.runtime = runtime
        self.extractor_source = extractor_source  # "pretrained" | "adapted" (metrics.json says which), or None
        # Eq. 9's constants for calibrated or positional normalisation (set by calibrate(), or given).
        self.score_scale = score_scale
        # scoring.reference "bank": each feature stage's bank of training patches (Eq. 8's reference)
        self.reference_banks: list[torch.Tensor] | None = None
        self.memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
        if isinstance(unet, torch.nn.Module):
            unet = unet.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)
            if runtime.compile:
                unet = self._compiled(unet)
        self.unet = unet
        self.table = alphas_cumprod(schedule).to(self.device, torch.float32)
        if config.sampler.start_step >= schedule.num_timesteps:
            raise ValueError(f"start_step {config.sampler.start_step} must be below T={schedule.num_timesteps}")
        self.extractor: FeatureExtractor | None = None
        if config.scoring.uses_features:
            if extractor is None:
                raise ValueError(f"{config.scoring.mode} scoring needs a feature extractor "
                                 f"(ddad.backbones.create_backbone({config.backbone!r}, ...)); or score pixel-wise")
            extractor = extractor.to(self.device).eval().requires_grad_(False)
            if isinstance(extractor, torch.nn.Module) and runtime.channels_last:
                extractor = extractor.to(memory_format=torch.channels_last)
            if isinstance(extractor, torch.nn.Module) and runtime.compile:
                extractor = self._compiled(extractor)
            self.extractor = extractor

    def _compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """``torch.compile`` for inference. On the CPU, freezing lets inductor fold the frozen weights into
        the graph and prepack them for oneDNN's convolutions."""
        options = {"freezing": True} if self.device.type == "cpu" else None
        return torch.compile(module, dynamic=False, options=options)

    def _denoiser(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xt = xt.contiguous(memory_format=self.memory_format)
        k = self.runtime.micro_batch
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
            if self.extractor is not None and self.config.scoring.reference == "bank":
                if self.reference_banks is None:
                    raise ValueError("scoring.reference 'bank' needs the banks of training patches (the run's loader "
                                     "fits them: ddad.methods.ddad.loading.load_detector)")
                feats = self.features(resize_for_features(y, self.config.scoring.feature_size))
                d_f = bank_feature_distance(feats, self.reference_banks, tuple(y.shape[-2:]),
                                            self.config.scoring.patch_size)
            elif self.extractor is not None:
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
        bs = self.runtime.batch_size
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

    def __call__(self, images: torch.Tensor, seeds: list[int] | None = None) -> AnomalyResult:
        return self.score(images, self.reconstruct(images, seeds))

    def score(self, images: torch.Tensor, reconstruction: torch.Tensor) -> AnomalyResult:
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
        return AnomalyResult(
            score=scores.cpu(), anomaly_map=maps.cpu(), reconstruction=x0.cpu(),
            extras={"pixel_distance": d_p.cpu(), "feature_distance": None if d_f is None else d_f.cpu()},
        )
