"""The Python API: the same operations as the ``ddad`` command, one function each.

    from ddad import RunConfig, train_run, test_run, predict, RunDir
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .checkpoint import atomic_write_text
from .config import ConfigError, RunConfig
from .data.dataset import ImageSet
from .data.formats import DataConfig, build_index
from .training import TrainResult, train
from .runs import RunDir


def train_run(config: RunConfig, run_dir: Path | str, resume: bool = False, progress: bool = True,
              on_step=None) -> TrainResult:
    """Train ``config`` into ``run_dir`` (created), or continue it with ``resume``."""
    run = RunDir(run_dir)
    if resume:
        stored = run.load_config()
        if replace(stored, train=config.train) != config:
            raise ConfigError(f"--resume: settings differ from {run.config_path}; only train settings may change")
    elif run.latest_checkpoint() is not None:
        raise ConfigError(f"run directory {run.root} already holds checkpoints; pass --resume to continue it "
                          f"or choose another --run-dir")
    index = build_index(config.data)
    print(index.describe())
    run.root.mkdir(parents=True, exist_ok=True)
    run.save_config(config)
    atomic_write_text(run.root / "dataset.json", json.dumps(index.statistics(), indent=2))
    images = load_train_images(run, config, index, progress)
    return train(run, config, images, resume=resume, progress=progress, on_step=on_step)


def adapt_run(run_dir: Path | str, overrides: dict | None = None, resume: bool = True, progress: bool = True,
              on_step=None) -> list[dict]:
    """Domain-adapt the run's feature extractor (Eq. 10) on its training images.

    ``overrides`` replaces fields of the run's ``adapt`` section (stored back into config.yaml)."""
    from .adaptation import AdaptConfig, adapt

    run = RunDir(run_dir).require()
    config = run.load_config()
    if overrides:
        merged = {**config.adapt.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
        config = replace(config, adapt=AdaptConfig(**{**merged, "layers": tuple(merged["layers"])}))
        run.save_config(config)
    images = load_train_images(run, config, build_index(config.data), progress)
    return adapt(run, config, images, resume=resume, progress=progress, on_step=on_step)


def load_train_images(run: RunDir, config: RunConfig, index=None, progress: bool = True):
    """The defect-free training images as one (N, C, H, W) tensor (unreadable files skipped and logged
    when ``skip_bad_files`` is set)."""
    index = index or build_index(config.data)
    train_set = ImageSet(index.train, config.data.image_size, config.data.channels)
    if config.data.skip_bad_files:
        report_skipped(run, train_set.drop_unreadable(), "training")
    return train_set.stack(progress=progress)


def report_skipped(run: RunDir, skipped: list, split: str) -> None:
    """Warn about and log files skipped by ``skip_bad_files``."""
    if not skipped:
        return
    print(f"warning: skipped {len(skipped)} unreadable {split} file(s) (skip_bad_files):")
    for sample, reason in skipped:
        print(f"  {reason}")
    run.log(f"skipped {len(skipped)} unreadable {split} file(s): " + "; ".join(r for _, r in skipped))


def import_official(checkpoint: Path | str, run_dir: Path | str, config: RunConfig, preset: str = "ddad",
                    epoch: int = 0) -> Path:
    """Write a run directory whose model is the authors' published checkpoint (keys 'module.'-prefixed
    or not), so that ``ddad test`` / ``predict`` evaluate it. The UNet shape comes from ``preset``."""
    import torch

    from .checkpoint import save_checkpoint
    from .diffusion.unet import UNet, UNetConfig, load_official_state_dict

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {checkpoint} as a torch state_dict: {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    # The authors trained with the paper's recipe (every timestep, so any T' is in range).
    config = config.with_recipe("paper", seed=config.train.seed, device=config.train.device)
    config = replace(config, model=UNetConfig.preset(preset, config.data.image_size, config.data.channels))
    model = UNet(config.model)
    load_official_state_dict(model, state)
    run = RunDir(run_dir)
    if run.latest_checkpoint() is not None:
        raise ConfigError(f"run directory {run.root} already holds checkpoints")
    run.root.mkdir(parents=True, exist_ok=True)
    run.save_config(config)
    path = run.checkpoint_path(epoch)
    save_checkpoint(path, {"model": model}, {"epoch": epoch, "step": 0, "config": config.to_dict(),
                                             "imported_from": str(checkpoint)})
    run.log(f"imported official checkpoint {checkpoint}")
    return path


def demo(out: Path | str, epochs: int = 80, category: str = "washer", progress: bool = True) -> tuple[dict, Path]:
    """The built-in example: synthetic data -> tiny UNet at 32 x 32 -> test with images and metrics.

    Scores combine pixel and MobileNetV2 features when torchvision's mobilenet_v2 weights are found
    offline, else pixel-only (stated in metrics.json)."""
    from .backbones import WeightsNotFound, resolve_weights
    from .data.synth import SynthConfig, generate
    from .detection import DetectConfig
    from .diffusion.sampler import SamplerConfig
    from .diffusion.unet import UNetConfig
    from .evaluation import test_run
    from .scoring import ScoringConfig
    from .training import TrainConfig

    out = Path(out)
    data_root = out / "data"
    if not (data_root / category).is_dir():
        generate(data_root, SynthConfig(categories=(category,)))
    try:
        resolve_weights("mobilenet_v2")
        scoring = ScoringConfig(mode="combined", v=1.0, sigma=1.0)
    except WeightsNotFound:
        print("mobilenet_v2 weights not found offline: scoring pixel-only")
        scoring = ScoringConfig(mode="pixel", sigma=1.0)
    size = 32
    config = RunConfig(
        data=DataConfig(dataset="mvtec", root=str(data_root), category=category, image_size=size, channels=3),
        model=UNetConfig.tiny(size, 3),
        train=TrainConfig(epochs=epochs, batch_size=16, checkpoint_every=max(1, epochs // 4)),
        detect=DetectConfig(sampler=SamplerConfig(start_step=250, skip=25, w=3.0, eta=1.0), scoring=scoring,
                            backbone="mobilenet_v2", crop=1.0, batch_size=16),
    )
    run = RunDir(out / "run")
    train_run(config, run.root, resume=run.latest_checkpoint() is not None, progress=progress)
    metrics = test_run(run, progress=progress)
    from .report import write_report

    write_report(run)
    return metrics, run.root
