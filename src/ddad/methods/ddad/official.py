"""Import of the DDAD authors' published UNet checkpoints (github arimousa/DDAD) as a ddad run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ...checkpoint import save_checkpoint
from ...config import ConfigError
from ...diffusion.unet import UNet, UNetConfig, load_official_state_dict
from ...runs import RunDir
from .settings import DDADConfig


def import_official(checkpoint: Path | str, run_dir: Path | str, config: DDADConfig, preset: str = "ddad",
                    epoch: int = 0) -> Path:
    """Write a run directory whose model is the authors' published checkpoint (keys 'module.'-prefixed
    or not), so that ``ddad test`` / ``predict`` evaluate it. The UNet shape comes from ``preset``."""
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
    if run.checkpoints():
        raise ConfigError(f"run directory {run.root} already holds checkpoints")
    run.root.mkdir(parents=True, exist_ok=True)
    run.save_config(config)
    path = run.checkpoint_path(epoch)
    save_checkpoint(path, {"model": model}, {"epoch": epoch, "step": 0, "config": config.to_dict(),
                                             "imported_from": str(checkpoint)})
    run.log(f"imported official checkpoint {checkpoint}")
    return path
