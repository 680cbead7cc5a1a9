"""The run directory: one folder per trained model.

    RUN_DIR/config.yaml                    the full RunConfig
    RUN_DIR/dataset.json                   dataset statistics at training time
    RUN_DIR/train.log                      one line per epoch and per event
    RUN_DIR/checkpoints/epoch-NNNNN.safetensors   weights + optimizer state (resumable)
    RUN_DIR/test/                          written by ``ddad test``
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from .checkpoint import Checkpoint, atomic_write_text
from .config import RunConfig
from .diffusion.unet import UNet

_EPOCH_RE = re.compile(r"^epoch-(\d+)\.safetensors$")


class RunDir:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.root / "train.log"

    @property
    def test_dir(self) -> Path:
        return self.root / "test"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def require(self) -> "RunDir":
        if not self.root.is_dir():
            raise FileNotFoundError(f"run directory {self.root} does not exist")
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a ddad run directory: {self.config_path} is missing")
        return self

    def load_config(self) -> RunConfig:
        return RunConfig.from_yaml(self.require().config_path)

    def save_config(self, config: RunConfig) -> None:
        atomic_write_text(self.config_path, config.to_yaml())

    def checkpoint_path(self, epoch: int) -> Path:
        return self.checkpoint_dir / f"epoch-{epoch:05d}.safetensors"

    def checkpoints(self) -> list[tuple[int, Path]]:
        if not self.checkpoint_dir.is_dir():
            return []
        found = []
        for p in self.checkpoint_dir.iterdir():
            m = _EPOCH_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def log(self, message: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def load_unet(self, device: torch.device | str = "cpu", checkpoint: Path | None = None) -> UNet:
        """The trained denoiser from ``checkpoint`` (default: the latest), in eval mode."""
        config = self.load_config()
        path = checkpoint or self.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"run {self.root} has no checkpoint in {self.checkpoint_dir}; train it first")
        ckpt = Checkpoint(path)
        model = UNet(config.model)
        model.load_state_dict(ckpt.state_dict("model"))
        return model.to(device).eval().requires_grad_(False)
