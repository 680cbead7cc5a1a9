"""A DDAD run's detector: its networks (PyTorch checkpoint or exported graphs), its calibration key and
score scale, and the cached reconstructions that let rescoring skip the diffusion.

    RUN_DIR/cache/recon-<key>.safetensors   x0 of every test image, keyed by everything that makes it
"""

from __future__ import annotations

import hashlib
import json

import torch
from ddad_infer.images import READER
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ...checkpoint import Checkpoint, atomic_write
from ...config import override, to_plain
from ...data.formats import build_index
from ...data.splits import TestSplit, calibration_images, readable_batches
from ...diffusion.unet import UNet, UNetConfig
from ...engine.calibration import CalibrationKey, file_id, stored_scale
from ...engine.undertraining import checkpoint_warning
from ...engine.detection import LoadedDetector
from ...engine.distributed import context
from ...memory_bank import BankConfig, fit_coreset, load_bank, save_bank, stored_banks
from ...results import AnomalyResult
from ...runs import RunDir, WeightsConfig
from ...runtime import resolve_device
from ...scoring import ScoreScale, reference_patches, resize_for_features
from .detector import Detector
from .extractors import load_extractor
from .graphs import EXPORT_DIR, onnx_networks
from ...engine.recipe import check_trained_timestep
from .settings import DDADConfig


def load_unet(run: RunDir, model: UNetConfig, device: torch.device | str, weights: WeightsConfig) -> UNet:
    """The trained denoiser from ``weights.checkpoint`` (default: the latest), in eval mode: the
    exponential moving average of its weights where the run kept one and ``weights.average`` is "ema",
    else the raw weights."""
    ckpt = Checkpoint(run.resolve_checkpoint(weights.checkpoint))
    unet = UNet(model)
    unet.load_state_dict(weights.state_dict(ckpt))
    return unet.to(device).eval().requires_grad_(False)


def build_detector(run: RunDir, config: DDADConfig) -> tuple[Detector, list]:
    """The run's detector for ``config`` (uncalibrated), and the identities of its network files."""
    detect, weights, runtime = config.detect, config.weights, config.runtime
    check_trained_timestep(config.train, detect.sampler.start_step, detect.force_timestep)
    if runtime.backend == "onnxruntime":  # the exported graphs are the networks
        unet, extractor = onnx_networks(run, detect)
        networks = [file_id(run.root / EXPORT_DIR / name) for name in ("unet.onnx", "extractor.onnx")
                    if (run.root / EXPORT_DIR / name).is_file()]
        return Detector(unet, detect, config.schedule, extractor=extractor, runtime=runtime, device="cpu",
                        extractor_source=None if extractor is None else "exported"), networks
    device = resolve_device(runtime.device)
    unet = load_unet(run, config.model, device, weights)
    extractor, adapted_file = load_extractor(run, detect, weights, runtime)
    networks = [file_id(run.resolve_checkpoint(weights.checkpoint)),
                ["adapted", *file_id(adapted_file)] if adapted_file is not None
                else ["pretrained", detect.backbone, weights.backbone_weights] if extractor is not None else None]
    source = None if extractor is None else "adapted" if adapted_file else "pretrained"
    return Detector(unet, detect, config.schedule, extractor=extractor, runtime=runtime, device=device,
                    extractor_source=source), networks


def scale_key(config: DDADConfig, networks: list) -> CalibrationKey:
    """The key of a score scale: the calibration key of the settings the distances depend on (so one scale
    serves every v, sigma and crop)."""
    return CalibrationKey.of(config.detect.distance_settings(), config.weights, networks, config.data)


def calibrate(detector: Detector, run: RunDir, config: DDADConfig, key: CalibrationKey,
              progress: bool = True) -> ScoreScale:
    """Eq. 9's maxima (and positional means) on a seeded subset of the run's defect-free training images,
    stored in the run under ``key`` (:func:`scale_key`) so that later tests and predictions, also on a
    machine without the training data, reuse them."""

    def compute() -> ScoreScale:
        held_out = config.detect.scoring.reference == "bank"  # a bank holds the training images' patches
        images = calibration_images(config.data, config.detect.scoring.calibration_images, config.detect.seed,
                                    held_out)
        bar = tqdm(total=len(images), desc="calibrate", unit="img", disable=not progress, dynamic_ncols=True,
                   leave=False)
        scale = detector.calibrate(images, progress=bar.update)
        bar.close()
        return scale

    detector.score_scale = stored_scale(run, key, compute)
    return detector.score_scale


def reference_banks(run: RunDir, config: DDADConfig, detector: Detector, extractor_identity: list,
                    progress: bool = True) -> tuple[list[torch.Tensor], list]:
    """Eq. 8's banks for ``scoring.reference`` "bank": each feature stage's coreset of the training images'
    unit-length locally aware patches (:func:`ddad.scoring.reference_patches`), fitted once and kept in
    RUN_DIR/banks under a name that holds everything they depend on. Returns the banks and their file
    identities (for the calibration key)."""
    scoring = config.detect.scoring
    identity = {"extractor": extractor_identity, "layers": list(scoring.feature_layers),
                "patch_size": scoring.patch_size, "feature_size": scoring.feature_size,
                "fraction": scoring.bank_fraction, "precision": config.detect.precision, "data": to_plain(config.data)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    names = [f"reference-{digest}-stage{j}" for j in scoring.feature_layers]
    stored = stored_banks(run.banks_dir)
    if not all(name in stored for name in names):
        batches: list[list[torch.Tensor]] = [[] for _ in names]
        n_images = 0
        for images, _ in readable_batches(build_index(config.data).train, config.data, config.runtime.batch_size,
                                          progress, "reference bank"):
            feats = detector.features(resize_for_features(images, scoring.feature_size))
            for j, patches in enumerate(reference_patches(feats, scoring.patch_size)):
                batches[j].append(patches.cpu())
            n_images += len(images)
        for name, parts in zip(names, batches):
            patches = torch.cat(parts)
            bank = fit_coreset(patches, BankConfig(fraction=scoring.bank_fraction), progress)
            if context().is_main:
                save_bank(run.banks_dir, name, bank, images=n_images, patches=len(patches), **identity)
            run.log(f"Eq. 8 reference bank {name}: {len(bank)} of {len(patches)} patches from {n_images} images")
        stored = stored_banks(run.banks_dir)
    return [load_bank(stored[name])[0] for name in names], [file_id(stored[name]) for name in names]


def load_detector(run: RunDir, config: DDADConfig, calibrate_scale: bool = True,
                  progress: bool = True) -> tuple[Detector, CalibrationKey]:
    """The run's :class:`Detector` for ``config``, calibrated where its scoring needs it, and its key."""
    detector, networks = build_detector(run, config)
    if config.detect.scoring.uses_features and config.detect.scoring.reference == "bank":
        detector.reference_banks, bank_ids = reference_banks(run, config, detector, networks[1:], progress)
        networks = [*networks, *bank_ids]
    if calibrate_scale and config.detect.scoring.needs_calibration:
        calibrate(detector, run, config, scale_key(config, networks), progress)
    return detector, CalibrationKey.of(config.detect, config.weights, networks, config.data)


def _cache_key(run: RunDir, config: DDADConfig, samples: list) -> str:
    """What a reconstruction depends on: the denoiser's file (a checkpoint, or the exported graph) and which
    of its weights, the sampler settings (:meth:`DetectConfig.reconstruction_settings`), data and images."""
    denoiser = (run.root / EXPORT_DIR / "unet.onnx" if config.runtime.backend == "onnxruntime"
                else run.resolve_checkpoint(config.weights.checkpoint))
    key = {"denoiser": [config.runtime.backend, *file_id(denoiser)], "average": config.weights.average,
           "reader": READER,  # how the images were decoded and resized (the noise is seeded by the result)
           "detect": to_plain(config.detect.reconstruction_settings()), "data": to_plain(config.data),
           "images": [str(s.image) for s in samples]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def reconstruct_split(detector: Detector, run: RunDir, config: DDADConfig, split: TestSplit,
                      cache: bool = True, progress: bool = True) -> torch.Tensor:
    """x0 for every test image; stored in RUN_DIR/cache so that rescoring never re-runs the diffusion
    (the key covers the checkpoint, sampler settings, seed, data and image list)."""
    path = run.root / "cache" / f"recon-{_cache_key(run, config, split.samples)}.safetensors"
    if cache and path.is_file():
        return load_file(str(path))["reconstruction"]
    out = []
    bs = config.runtime.batch_size
    bar = tqdm(total=len(split.images), desc="reconstruct", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(split.images), bs):
        out.append(detector.reconstruct(split.images[start:start + bs]).cpu())
        bar.update(len(out[-1]))
    bar.close()
    recon = torch.cat(out)
    if cache:
        atomic_write(path, lambda tmp: save_file({"reconstruction": recon.contiguous()}, tmp))
    return recon


def score_split(detector: Detector, split: TestSplit, recon: torch.Tensor) -> AnomalyResult:
    """Score all test images against their reconstructions, batch by batch."""
    bs = detector.runtime.batch_size
    return AnomalyResult.concat([detector.score(split.images[i:i + bs], recon[i:i + bs])
                                 for i in range(0, len(split.images), bs)])


def loaded_detector(run: RunDir, config: DDADConfig, progress: bool = True) -> LoadedDetector:
    """The engine's view of the run's detector (``ddad test`` and ``ddad predict``)."""
    detector, key = load_detector(run, config, progress=progress)

    def scorer(split: TestSplit, cache: bool, show: bool) -> AnomalyResult:
        return score_split(detector, split, reconstruct_split(detector, run, config, split, cache, show))

    scale = detector.score_scale
    record = Checkpoint(run.resolve_checkpoint(config.weights.checkpoint)).info
    info = {"extractor": detector.extractor_source, "score_scale": None if scale is None else scale.to_dict(),
            "undertrained": [w for w in [checkpoint_warning(record)] if w]}
    settings = {"detect": to_plain(config.detect), "weights": to_plain(config.weights),
                "runtime": to_plain(config.runtime)}
    return LoadedDetector(detect=detector, data=config.data, key=key, batch_size=config.runtime.batch_size,
                          settings=settings, crop=config.detect.crop, info=info, split_scorer=scorer)


def with_detection(config: DDADConfig, **changes) -> DDADConfig:
    """``config`` with detection settings replaced by name, wherever they are in detect, weights or runtime
    (None values ignored; ``adapted_epoch`` implies ``adapted``)."""
    if changes.get("adapted_epoch") is not None:
        changes.setdefault("adapted", True)
    return override(config, changes, within=("detect", "weights", "runtime"))

