"""DRDC's settings (Enhancing Multi-Class Anomaly Detection via Diffusion Refinement with Dual Conditioning):
the base model's features, the transformer that reconstructs them, detection, and the run's config.yaml.

The defaults are UniAD's public configuration (You et al., NeurIPS 2022), which DRDC's base model follows
(paper Sec. 3.1-3.2, 4.5): EfficientNet-b4 stages of strides 2/4/8/16 at 224 px, resized to 14 x 14;
hidden width 256, 4 + 4 layers, 8 heads, FFN 1024, dropout 0.1, a 7 x 7 neighbour mask, feature jitter 20;
AdamW lr 1e-4, weight decay 1e-4, batch 64, 1000 epochs with the rate x0.1 at 800, gradients clipped at 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ...backbones import BACKBONES
from ...config import RunSettings
from ...data.formats import DataConfig
from ...engine.recipe import TrainConfig
from ...runs import WeightsConfig
from ...runtime import PRECISIONS, RuntimeConfig

# UniAD's training (no warm-up, no EMA; the diffusion-only settings of TrainConfig do not apply).
UNIAD_TRAINING = {"epochs": 1000, "batch_size": 64, "lr": 1e-4, "weight_decay": 1e-4, "optimizer": "adamw",
                  "warmup_steps": 0, "grad_clip": 0.1, "ema_decay": 0.0, "lr_decay_epochs": (800,),
                  "lr_decay": 0.1, "checkpoint_every": 50}
RECIPES = {"default": UNIAD_TRAINING, "paper": UNIAD_TRAINING}


@dataclass(frozen=True)
class FeatureConfig:
    """The frozen backbone's features that the transformer reconstructs."""

    backbone: str = "efficientnet_b4"
    strides: tuple[int, ...] = (2, 4, 8, 16)  # the stages used, each resized (bilinear) to grid x grid
    grid: int = 14  # the token grid (stride 16 of 224)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.grid < 2:
            raise ValueError(f"grid must be >= 2, got {self.grid}")


@dataclass(frozen=True)
class ReconstructionConfig:
    """The transformer that reconstructs the feature tokens (Eq. 1)."""

    hidden: int = 256
    encoder_layers: int = 4
    decoder_layers: int = 4
    heads: int = 8
    ffn: int = 1024
    dropout: float = 0.1
    neighbour: int = 7  # a token may not attend to its own k x k neighbourhood (0: no mask)
    jitter_scale: float = 20.0  # training only: noise of each token's norm / channels, times this
    jitter_prob: float = 1.0  # chance that a training batch is jittered

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.neighbour < 0 or (self.neighbour and self.neighbour % 2 == 0):
            raise ValueError(f"neighbour must be 0 or odd, got {self.neighbour}")
        if min(self.encoder_layers, self.decoder_layers) < 1:
            raise ValueError("the transformer needs at least one encoder and one decoder layer")
        if not 0 <= self.jitter_prob <= 1 or self.jitter_scale < 0:
            raise ValueError(f"jitter_prob must be in [0, 1] and jitter_scale >= 0, got {self.jitter_prob}, "
                             f"{self.jitter_scale}")


@dataclass(frozen=True)
class DRDCDetect:
    """How the base heatmap becomes a score: the image score is the max of the pool x pool average-pooled
    map (Eq. 2; UniAD 16 x 16, stride 1)."""

    pool: int = 16
    crop: float = 1.0  # centre crop of maps and masks for the metrics
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if not 0 < self.crop <= 1:
            raise ValueError(f"crop must be in (0, 1], got {self.crop}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass(frozen=True)
class DRDCConfig(RunSettings):
    """A DRDC run's config.yaml: one model for all the categories its data names."""

    method: str = "drdc"
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=224))
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**UNIAD_TRAINING))
    detect: DRDCDetect = field(default_factory=DRDCDetect)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.method != "drdc":
            raise ValueError(f"a DRDC config has method 'drdc', got {self.method!r}")

    def with_recipe(self, name: str, **train_overrides: Any) -> "DRDCConfig":
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r} for drdc; choose one of {', '.join(RECIPES)}")
        return replace(self, train=TrainConfig(**{**RECIPES[name], **train_overrides}))
