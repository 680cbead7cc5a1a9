"""PatchCore's settings: the patch features, the memory bank, detection, and the run's config.yaml.

The defaults are the paper's (Roth et al. 2022, Sec. 3-4): WideResNet-50 stages 2 and 3 (strides 8 and 16),
each position averaged over its 3 x 3 neighbourhood ("locally aware"), the deeper stage upsampled to the
shallower one's grid and concatenated; a greedy coreset of 10 % of the training patches on a random
projection to 128 dimensions; the anomaly map is the nearest-neighbour distance of each patch, upsampled
and smoothed by a Gaussian of sigma 4; the image score is its maximum. Where the paper's backbone weights
are not on the machine, the run says which backbone it took.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...backbones import BACKBONES
from ...config import RunSettings
from ...data.formats import DataConfig
from ...engine.recipe import TrainConfig
from ...memory_bank import BankConfig
from ...runs import WeightsConfig
from ...runtime import RuntimeConfig


@dataclass(frozen=True)
class PatchFeatures:
    """Which backbone stages make a patch's feature, and how."""

    backbone: str = "wide_resnet50_2"
    layers: tuple[int, ...] = (2, 3)  # stages at strides 8 and 16
    patch_size: int = 3  # each position averaged over its p x p neighbourhood
    input_size: int | None = None  # the backbone sees the images resized to this size (None: as they are)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if not self.layers or min(self.layers) < 1 or max(self.layers) > 4:
            raise ValueError(f"features.layers must be stages within 1..4, got {list(self.layers)}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"features.patch_size must be odd and >= 1, got {self.patch_size}")


@dataclass(frozen=True)
class PatchCoreDetect:
    """How the patch distances become a map and a score."""

    sigma: float = 4.0  # Gaussian smoothing of the upsampled map, in pixels
    crop: float = 1.0  # centre crop of maps and masks for the metrics and the score

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"detect.sigma must be >= 0, got {self.sigma}")
        if not 0 < self.crop <= 1:
            raise ValueError(f"detect.crop must be in (0, 1], got {self.crop}")


@dataclass(frozen=True)
class PatchCoreConfig(RunSettings):
    """A PatchCore run's config.yaml. ``train`` holds only what fitting a bank uses (device, seed,
    batch size of the feature pass); PatchCore trains nothing."""

    method: str = "patchcore"
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=224))
    features: PatchFeatures = field(default_factory=PatchFeatures)
    bank: BankConfig = field(default_factory=BankConfig)
    detect: PatchCoreDetect = field(default_factory=PatchCoreDetect)
    train: TrainConfig = field(default_factory=TrainConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.method != "patchcore":
            raise ValueError(f"a PatchCore config has method 'patchcore', got {self.method!r}")

    def with_recipe(self, name: str, **train_overrides: Any) -> "PatchCoreConfig":
        """PatchCore has no training recipe: the name is accepted and changes nothing."""
        return self
