"""DDAD as a method of the engine: what it trains, how its detector loads, what it exports."""

from __future__ import annotations

from pathlib import Path

import torch

from ...data.dataset import DatasetIndex
from ...diffusion.objective import DDPMObjective
from ...diffusion.schedule import alphas_cumprod
from ...diffusion.unet import UNet
from ...engine.detection import LoadedDetector
from ...engine.undertraining import diffusion_rule
from ...engine.trainer import StepHook, TrainResult, fit
from ...runs import RunDir
from .graphs import export_model
from .loading import load_detector, loaded_detector, with_detection
from .settings import DDADConfig


class DDAD:
    """Conditioned denoising diffusion (Mousakhan et al.): one UNet per category, trained on its
    defect-free images; detection reconstructs (Alg. 1) and compares (Eq. 8-9)."""

    name = "ddad"
    settings = DDADConfig
    one_model_per_category = True  # several categories: trained one after another (ddad.engine.per_category)
    with_detection = staticmethod(with_detection)
    backbone_setting = ("detect", "backbone")  # where ``--backbone`` goes
    preferred_backbones = ("wide_resnet101_2", "mobilenet_v2")  # the paper's, else ddad's README install's
    needs_features = False  # pixel-wise scoring works without a backbone

    def check_training_set(self, config: DDADConfig, index: DatasetIndex) -> None:
        if len(index.categories) > 1:
            raise ValueError(
                f"DDAD trains one model per category, as in the paper, and {config.data.category!r} names "
                f"{len(index.categories)} ({', '.join(index.categories)}): train each in its own run "
                f"(--category {index.categories[0]} --run-dir ...)")

    def fit(self, run: RunDir, config: DDADConfig, images: torch.Tensor, resume: bool = False,
            progress: bool = True, on_step: StepHook | None = None, index: DatasetIndex | None = None,
            started: float | None = None) -> TrainResult:
        """Train the UNet of ``config.model`` on ``images`` (N, C, H, W) with the DDPM objective; the time
        budget counts from ``started`` (see :func:`ddad.engine.trainer.fit`)."""
        model, tc, n_timesteps = config.model, config.train, config.schedule.num_timesteps
        if images.ndim != 4 or images.shape[1] != model.in_channels:
            raise ValueError(f"images must be (N, {model.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-1] != model.image_size or images.shape[-2] != model.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} but the UNet expects {model.image_size}")
        t_high = tc.timestep_high(n_timesteps)

        def objective(device: torch.device) -> DDPMObjective:
            table = alphas_cumprod(config.schedule).to(device=device, dtype=torch.float32)
            return DDPMObjective(table, t_high, tc.loss_reduction, tc.timestep_weighting, tc.min_snr_gamma)

        return fit(run, tc, lambda: UNet(model), objective, images, {"config": config.to_dict()}, resume, progress,
                   on_step, started, rule=diffusion_rule(tc))

    def load(self, run: RunDir, config: DDADConfig, progress: bool = True) -> LoadedDetector:
        return loaded_detector(run, config, progress)

    def export(self, run: RunDir, config: DDADConfig, out_dir: Path | None = None,
               progress: bool = True, fmt: str = "onnx") -> Path:
        detector, key = load_detector(run, config, progress=progress)
        return export_model(detector, run, config, out_dir, progress, fmt, key)
