"""Where and how to run: the one place that chooses a device, and the runtime settings of detection.

Runtime settings never change what a score means: they choose the device, the batch size, the engine
(PyTorch or exported graphs) and speed options. They are not part of the calibration key.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("torch", "onnxruntime")


@dataclass(frozen=True)
class RuntimeConfig:
    """How detection runs (any method)."""

    device: str = "auto"
    backend: str = "torch"  # torch | onnxruntime (graphs from `ddad export`)
    batch_size: int = 16
    channels_last: bool = False  # NHWC memory layout for the networks
    compile: bool = False  # torch.compile the networks (the first batch pays the compile time)
    # Run the denoiser on chunks of this many images (0: the whole batch; None: automatic, i.e. on the CPU
    # chunks of about 64 x 64 x 16 pixels, which stay in cache: at 256 px batch 16 is 1.7x slower per
    # image than batch 1; on a GPU the whole batch).
    micro_batch: int | None = None
    allow_download: bool = False  # download missing backbone weights (never by default)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch is not None and self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0, got {self.micro_batch}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but no CUDA GPU is available (use --device cpu or auto)")
    return device


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` on ``device`` (fp32: none)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
