"""DRDC as a method of the engine: one model for all the categories its data names, trained on their
defect-free images at once. Two models are trained in turn in one run: the transformer base model
(checkpoints/) and, unless ``refine.enabled`` is off, the inpainting UNet of the diffusion refinement
(checkpoints/refine/), each with its own budget (``train``, ``refine_train``) and both resumable."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ...checkpoint import Checkpoint
from ...config import override, to_plain
from ...data.dataset import DatasetIndex
from ...data.formats import build_index
from ...data.splits import calibration_set
from ...diffusion.inpainting import InpaintingObjective
from ...diffusion.objective import DDPMObjective
from ...diffusion.schedule import alphas_cumprod
from ...diffusion.unet import UNet
from ...engine.calibration import CalibrationKey, file_id, stored_scale
from ...engine.detection import LoadedDetector
from ...engine.recognition import backbone_embed
from ...engine.distributed import context
from ...engine.trainer import StepHook, TrainResult, fit
from ...engine.undertraining import TRANSFORMER_MIN_STEPS, Rule, checkpoint_warning, diffusion_rule
from ...memory_bank import UNIFIED, as_patches, bank_groups, fit_coreset, load_banks, save_bank, stored_banks
from ...runs import RunDir
from ...runtime import resolve_device
from .detector import DRDCDetector, score_split
from .refiner import Refiner, resized
from .features import build_extractor, cache_key, cached_features, feature_channels, features_in_batches
from .model import FeatureReconstructionObjective, FeatureReconstructor, TokenBank
from .settings import DRDCConfig


SCORING_SECTIONS = ("features", "model", "bank", "refine", "detect")  # the settings a DRDC score depends on


def calibration_keys(config: DRDCConfig, networks: list) -> tuple[CalibrationKey, CalibrationKey]:
    """The run's calibration key (its thresholds: every setting of :data:`SCORING_SECTIONS`, field by field)
    and the unscaled maps' own key (their scale of Eq. 17 and the reused maps: the same but Eq. 17's weight,
    the pooling and the crop, see :meth:`DRDCDetect.map_settings`)."""
    sections = {name: getattr(config, name) for name in SCORING_SECTIONS}
    key = CalibrationKey.of(sections, config.weights, networks, config.data)
    maps_key = CalibrationKey.of({**sections, "detect": config.detect.map_settings()}, config.weights, networks,
                                 config.data)
    return key, maps_key


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
            progress: bool = True, on_step: StepHook | None = None, index: DatasetIndex | None = None,
            started: float | None = None) -> TrainResult:
        """Train the reconstructor on the (cached) features of ``images``: the training images of ``index``.
        The base's time budget counts from ``started`` (the command's start), the refiner's from the base's end."""
        index = index or build_index(config.data)
        device = resolve_device(config.train.device)
        extractor = build_extractor(config.features, config.weights, config.runtime).to(device)
        key = cache_key(config.features, config.weights, config.data, index.train)
        feats = cached_features(run, key, lambda: features_in_batches(
            extractor, images, config.features.grid, config.runtime.batch_size, device, progress))
        channels = feature_channels(extractor)
        info = {"config": config.to_dict(), "categories": index.categories, "channels": channels}
        if config.features.base == "bank":
            base = self.fit_token_bank(run, config, feats, info, resume, progress, index)
        else:
            base = fit(run, config.train, lambda: FeatureReconstructor(channels, config.features.grid, config.model),
                       lambda device: FeatureReconstructionObjective(config.model), feats, info, resume, progress,
                       on_step, started, label="base", rule=Rule(min_steps=TRANSFORMER_MIN_STEPS))
        if not config.refine.enabled or base.stopped_by == "interrupted":
            return base
        refined = self.fit_refiner(run, config, images, info, resume, progress, on_step)
        return replace(refined, warning="\n".join(filter(None, [base.warning, refined.warning])) or None)

    def fit_token_bank(self, run: RunDir, config: DRDCConfig, feats: torch.Tensor, info: dict, resume: bool,
                       progress: bool, index: DatasetIndex) -> TrainResult:
        """The memory-bank base: a coreset of the training tokens (``bank``: one for all categories, or one per
        category), kept in the run; nothing trained. Each bank is saved when chosen; resuming fits only the
        missing ones."""
        t0 = time.perf_counter()
        have = stored_banks(run.banks_dir)
        if have and not resume:
            raise ValueError(f"run directory {run.root} already holds memory banks ({', '.join(have)}); pass "
                             f"--resume to continue it or choose another --run-dir")
        path, fitted = run.banks_dir, 0
        for name, members in bank_groups(config.bank.per_category, [s.category for s in index.train]).items():
            if name in have:
                run.log(f"memory-bank base {name}: kept ({have[name].name})")
                continue
            tokens = as_patches(feats[members])
            bank = fit_coreset(tokens, config.bank, progress)
            if context().is_main:
                categories = info["categories"] if name == UNIFIED else [name]
                path = save_bank(run.banks_dir, name, bank, categories=categories, tokens=len(tokens),
                                 images=len(members))
                run.log(f"memory-bank base {name}: {len(bank)} of {len(tokens)} tokens from {len(members)} images")
            fitted += len(members)
        return TrainResult(1, math.nan, str(path), fitted / max(time.perf_counter() - t0, 1e-9), stopped_by="fitted")

    def fit_refiner(self, run: RunDir, config: DRDCConfig, images: torch.Tensor, info: dict, resume: bool = False,
                    progress: bool = True, on_step: StepHook | None = None) -> TrainResult:
        """The inpainting UNet (Sec. 4.3, Eq. 10) on ``images`` resized to ``refine.image_size``: epsilon
        prediction with random masks, the masked image as its condition (or plain DDPM without model
        conditioning)."""
        refine, tc = config.refine, config.refine_train
        part = run.part_of("refine")
        small = torch.cat([resized(images[i:i + 256], refine.image_size) for i in range(0, len(images), 256)])
        unet = refine.unet_config(images.shape[1])
        t_high = tc.timestep_high(refine.schedule.num_timesteps)

        def objective(device: torch.device):
            table = alphas_cumprod(refine.schedule).to(device=device, dtype=torch.float32)
            if refine.model_conditioning:
                return InpaintingObjective(table, t_high, refine.cells, refine.sets)
            return DDPMObjective(table, t_high, tc.loss_reduction, tc.timestep_weighting, tc.min_snr_gamma)

        return fit(part, tc, lambda: UNet(unet), objective, small, info,
                   resume and part.latest_checkpoint() is not None, progress, on_step, label="refiner",
                   rule=diffusion_rule(None if refine.model_conditioning else tc))

    def load(self, run: RunDir, config: DRDCConfig, progress: bool = True) -> LoadedDetector:
        if config.runtime.backend != "torch":
            raise ValueError("drdc runs in PyTorch only so far (--backend torch)")
        extractor = build_extractor(config.features, config.weights, config.runtime)
        index = build_index(config.data)
        warnings: list = []  # undertrained models (:mod:`ddad.engine.undertraining`)
        if config.features.base == "bank":
            banks = load_banks(run.banks_dir, list(bank_groups(config.bank.per_category,
                                                               [s.category for s in index.train])),
                               f"finish the run with: ddad train --resume --run-dir {run.root}")
            model = TokenBank({name: bank for name, (bank, _, _) in banks.items()})
            trained = list(dict.fromkeys(c for _, facts, _ in banks.values() for c in facts.get("categories") or []))
            ids = [file_id(path) for _, _, path in banks.values()]
        else:
            path = run.resolve_checkpoint(config.weights.checkpoint)
            ckpt = Checkpoint(path)
            trained = ckpt.info.get("categories") or []
            model = FeatureReconstructor(feature_channels(extractor), config.features.grid, config.model)
            model.load_state_dict(config.weights.state_dict(ckpt))
            ids = [file_id(path)]
            warnings.append(checkpoint_warning(ckpt.info, "base"))
        categories = index.categories
        unknown = [c for c in categories if c not in trained]
        if unknown:
            raise ValueError(f"category {', '.join(map(repr, unknown))} was not in this model's training "
                             f"({', '.join(trained) or 'none recorded'}): a unified model only knows what it saw")
        device = resolve_device(config.runtime.device)
        backbone = ["pretrained", config.features.backbone, config.weights.backbone_weights]
        networks = [*ids, backbone]
        refiner = None
        if config.refine.enabled:
            unet_path = run.part_of("refine").resolve_checkpoint(None)
            unet = UNet(config.refine.unet_config(config.data.channels))
            unet_ckpt = Checkpoint(unet_path)
            unet.load_state_dict(config.weights.state_dict(unet_ckpt))
            warnings.append(checkpoint_warning(unet_ckpt.info, "refiner"))
            refiner = Refiner(unet, alphas_cumprod(config.refine.schedule), config.refine, config.detect)
            networks.append(file_id(unet_path))
        detector = DRDCDetector(extractor, model, config.features, config.detect, device, refiner)
        held_out = config.features.base == "bank"  # the bank holds the training tokens: calibrate on others
        if refiner is not None and held_out:
            networks.append(["calibration", "held-out validation images"])
        key, maps_key = calibration_keys(config, networks)
        if refiner is not None:
            detector.scale = stored_scale(run, maps_key, lambda: detector.calibrate(*calibration_set(
                config.data, config.detect.calibration_images, config.detect.seed, held_out), progress=progress))
        settings = {name: to_plain(getattr(config, name)) for name in (*SCORING_SECTIONS, "weights", "runtime")}
        return LoadedDetector(detect=detector, data=config.data, key=key, batch_size=config.runtime.batch_size,
                              settings=settings, crop=config.detect.crop,
                              info={"extractor": "pretrained", "trained_categories": trained,
                                    "undertrained": [w for w in warnings if w]},
                              categories=categories, embed=backbone_embed(detector.extractor, detector.device),
                              embed_identity=backbone, by_category=config.features.base == "bank",
                              split_scorer=lambda split, cache, show: score_split(
                                  detector, split, config.runtime.batch_size, maps_key.digest, cache, show))

    def export(self, run: RunDir, config: DRDCConfig, out_dir: Path | None = None,
               progress: bool = True, fmt: str = "onnx") -> Path:
        from .graphs import export_model

        loaded = self.load(run, config, progress)
        return export_model(loaded, run, config, out_dir, progress, fmt)
