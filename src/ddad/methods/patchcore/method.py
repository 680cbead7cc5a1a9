"""PatchCore as a method of the engine: ``ddad train`` fits the memory bank(s) (no training), stored with
the run; test, predict, tune, thresholds and ``pred_score`` work as for the other methods.

    RUN_DIR/banks/<category>.safetensors    one bank per category ("all": one bank for every category),
                                            each written atomically once its coreset is chosen

Fitting again with ``--resume`` keeps the banks already written and fits the missing ones, so an
interrupted run loses only the bank it was choosing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...backbones import create_backbone
from ...config import override, to_plain
from ...data.dataset import DatasetIndex
from ...data.formats import build_index
from ...engine.calibration import CalibrationKey, file_id
from ...engine.detection import LoadedDetector
from ...engine.recognition import backbone_embed
from ...engine.distributed import context
from ...engine.trainer import StepHook, TrainResult
from ...memory_bank import as_patches, bank_groups, fit_coreset, load_banks, save_bank, stored_banks
from ...runs import RunDir
from ...runtime import resolve_device
from .model import PatchCoreDetector, patch_features
from .settings import PatchCoreConfig


def build_extractor(config: PatchCoreConfig):
    return create_backbone(config.features.backbone, config.features.layers, config.weights.backbone_weights,
                           config.runtime.allow_download)


def fit_bank(extractor, images: torch.Tensor, config: PatchCoreConfig, device: torch.device, name: str,
             progress: bool) -> tuple[torch.Tensor, int]:
    """(the coreset of ``images``' patches, how many patches there were)."""
    parts = []
    batch = config.runtime.batch_size
    for start in tqdm(range(0, len(images), batch), desc=f"features {name}", unit="batch", disable=not progress,
                      leave=False):
        parts.append(as_patches(patch_features(extractor, images[start:start + batch].to(device), config.features)
                                ).cpu())
    patches = torch.cat(parts)
    return fit_coreset(patches, config.bank, progress), len(patches)


class PatchCore:
    """Nearest-neighbour patch distances to a memory bank of defect-free patches (Roth et al. 2022)."""

    name = "patchcore"
    settings = PatchCoreConfig
    backbone_setting = ("features", "backbone")
    preferred_backbones = ("wide_resnet50_2", "mobilenet_v2")
    needs_features = True

    @staticmethod
    def with_detection(config: PatchCoreConfig, **changes) -> PatchCoreConfig:
        return override(config, changes, within=("detect", "weights", "runtime"))

    def check_training_set(self, config: PatchCoreConfig, index: DatasetIndex) -> None:
        if not index.train:
            raise ValueError(f"{index.name} has no defect-free training images")

    def fit(self, run: RunDir, config: PatchCoreConfig, images: torch.Tensor, resume: bool = False,
            progress: bool = True, on_step: StepHook | None = None, index: DatasetIndex | None = None,
            started: float | None = None) -> TrainResult:
        """Fit a bank per group of :func:`bank_groups` that the run does not hold yet."""
        index = index or build_index(config.data)
        have = stored_banks(run.banks_dir)
        if have and not resume:
            raise ValueError(f"run directory {run.root} already holds memory banks ({', '.join(have)}); pass "
                             f"--resume to fit the missing ones or choose another --run-dir")
        device = resolve_device(config.train.device)
        main = context(device.type).is_main
        log = run.log if main else (lambda message: None)
        extractor = build_extractor(config).to(device)
        t0, fitted, last = time.perf_counter(), 0, None
        log(f"fitting memory banks: {len(index.train)} images, device {device}, coreset {config.bank.fraction:g}")
        for name, members in bank_groups(config.bank.per_category, [s.category for s in index.train]).items():
            if name in have:
                log(f"bank {name}: kept ({have[name].name})")
                continue
            bank, patches = fit_bank(extractor, images[members], config, device, name, progress and main)
            if main:
                last = save_bank(run.banks_dir, name, bank, images=len(members), patches=patches)
            log(f"bank {name}: {len(bank)} of {patches} patches from {len(members)} images")
            fitted += len(members)
        seconds = time.perf_counter() - t0
        log(f"training stopped (fitted) with {len(stored_banks(run.banks_dir))} bank(s) in {seconds:.1f} s")
        return TrainResult(epochs_done=1, last_loss=math.nan, checkpoint=str(last or run.banks_dir),
                           images_per_second=fitted / max(seconds, 1e-9), stopped_by="fitted")

    def load(self, run: RunDir, config: PatchCoreConfig, progress: bool = True) -> LoadedDetector:
        if config.runtime.backend != "torch":
            raise ValueError("patchcore runs in PyTorch only so far (--backend torch)")
        index = build_index(config.data)
        names = list(bank_groups(config.bank.per_category, [s.category for s in index.train]))
        stored = load_banks(run.banks_dir, names, f"finish the run with: ddad train --resume --run-dir {run.root}")
        banks = {name: bank for name, (bank, _, _) in stored.items()}
        detector = PatchCoreDetector(build_extractor(config), banks, config.features, config.detect,
                                     resolve_device(config.runtime.device))
        backbone = ["pretrained", config.features.backbone, config.weights.backbone_weights]
        networks = [file_id(path) for _, _, path in stored.values()] + [backbone]
        sections = {name: getattr(config, name) for name in ("features", "bank", "detect")}
        key = CalibrationKey.of(sections, config.weights, networks, config.data)

        settings = {name: to_plain(getattr(config, name)) for name in ("features", "bank", "detect", "weights",
                                                                       "runtime")}
        return LoadedDetector(detect=detector, data=config.data, key=key, batch_size=config.runtime.batch_size,
                              settings=settings, crop=config.detect.crop,
                              info={"extractor": "pretrained", "banks": {n: len(b) for n, b in banks.items()}},
                              by_category=True, categories=index.categories,
                              embed=backbone_embed(detector.extractor, detector.device), embed_identity=backbone)

    def export(self, run: RunDir, config: PatchCoreConfig, out_dir: Path | None = None,
               progress: bool = True, fmt: str = "onnx") -> Path:
        from .graphs import export_model

        loaded = self.load(run, config, progress)
        return export_model(loaded, run, config, out_dir, progress, fmt)
