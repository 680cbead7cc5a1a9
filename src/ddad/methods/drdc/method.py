"""DRDC as a method of the engine. Part 1 (this): the transformer base model, trained on the defect-free
images of all the categories its data names at once, and its base heatmap. The diffusion refinement
(part 2) is not built yet."""

from __future__ import annotations

from pathlib import Path

import torch

from ...checkpoint import Checkpoint
from ...config import override, to_plain
from ...data.dataset import DatasetIndex
from ...data.formats import build_index
from ...engine.calibration import CalibrationKey, file_id
from ...engine.detection import LoadedDetector
from ...engine.trainer import StepHook, TrainResult, fit
from ...runs import RunDir
from ...runtime import resolve_device
from .detector import DRDCDetector
from .features import build_extractor, cache_key, cached_features, feature_channels, features_in_batches
from .model import FeatureReconstructionObjective, FeatureReconstructor
from .settings import DRDCConfig


class DRDC:
    """One model for many categories (the base model of DRDC, as UniAD)."""

    name = "drdc"
    settings = DRDCConfig
    backbone_setting = ("features", "backbone")  # where ``--backbone`` goes
    preferred_backbones = ("efficientnet_b4", "mobilenet_v2")
    needs_features = True

    @staticmethod
    def with_detection(config: DRDCConfig, **changes) -> DRDCConfig:
        return override(config, changes, within=("detect", "weights", "runtime"))

    def check_training_set(self, config: DRDCConfig, index: DatasetIndex) -> None:
        if not index.train:
            raise ValueError(f"{index.name} has no defect-free training images")

    def fit(self, run: RunDir, config: DRDCConfig, images: torch.Tensor, resume: bool = False,
            progress: bool = True, on_step: StepHook | None = None, index: DatasetIndex | None = None) -> TrainResult:
        """Train the reconstructor on the (cached) features of ``images``: the training images of ``index``."""
        index = index or build_index(config.data)
        device = resolve_device(config.train.device)
        extractor = build_extractor(config.features, config.weights, config.runtime).to(device)
        key = cache_key(config.features, config.weights, config.data, index.train)
        feats = cached_features(run, key, lambda: features_in_batches(
            extractor, images, config.features.grid, config.runtime.batch_size, device, progress))
        channels = feature_channels(extractor)
        info = {"config": config.to_dict(), "categories": index.categories, "channels": channels}
        return fit(run, config.train, lambda: FeatureReconstructor(channels, config.features.grid, config.model),
                   lambda device: FeatureReconstructionObjective(config.model), feats, info, resume, progress, on_step)

    def load(self, run: RunDir, config: DRDCConfig, progress: bool = True) -> LoadedDetector:
        if config.runtime.backend != "torch":
            raise ValueError("drdc runs in PyTorch only so far (--backend torch)")
        path = run.resolve_checkpoint(config.weights.checkpoint)
        ckpt = Checkpoint(path)
        trained = ckpt.info.get("categories") or []
        unknown = [c for c in build_index(config.data).categories if c not in trained]
        if unknown:
            raise ValueError(f"category {', '.join(map(repr, unknown))} was not in this model's training "
                             f"({', '.join(trained) or 'none recorded'}): a unified model only knows what it saw")
        device = resolve_device(config.runtime.device)
        extractor = build_extractor(config.features, config.weights, config.runtime)
        model = FeatureReconstructor(feature_channels(extractor), config.features.grid, config.model)
        prefix = "ema" if config.weights.average == "ema" and ckpt.has("ema") else "model"
        model.load_state_dict(ckpt.state_dict(prefix))
        detector = DRDCDetector(extractor, model, config.features, config.detect, device)
        networks = [file_id(path), ["pretrained", config.features.backbone, config.weights.backbone_weights]]
        key = CalibrationKey.of({"features": config.features, "model": config.model, "detect": config.detect},
                                config.weights, networks, config.data)
        settings = {name: to_plain(getattr(config, name)) for name in ("features", "model", "detect", "weights",
                                                                       "runtime")}
        return LoadedDetector(detect=detector, data=config.data, key=key, batch_size=config.runtime.batch_size,
                              settings=settings, crop=config.detect.crop,
                              info={"extractor": "pretrained", "trained_categories": trained})

    def export(self, run: RunDir, config: DRDCConfig, out_dir: Path | None = None) -> Path:
        raise ValueError("ddad export does not write drdc graphs yet (drdc runs in PyTorch)")
