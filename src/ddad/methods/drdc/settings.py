"""DRDC's settings (Enhancing Multi-Class Anomaly Detection via Diffusion Refinement with Dual Conditioning):
the base model's features, the transformer that reconstructs them, the diffusion refinement, detection, and
the run's config.yaml.

The defaults are UniAD's public configuration (You et al., NeurIPS 2022), which DRDC's base model follows
(paper Sec. 3.1-3.2, 4.5): EfficientNet-b4 stages of strides 2/4/8/16 at 224 px, resized to 14 x 14;
hidden width 256, 4 + 4 layers, 8 heads, FFN 1024, dropout 0.1, a 7 x 7 neighbour mask, feature jitter 20;
AdamW lr 1e-4, weight decay 1e-4, batch 64, 1000 epochs with the rate x0.1 at 800, gradients clipped at 0.1.
The refinement's defaults are the paper's where its text keeps them (224 px, DDAD's UNet with the condition
as extra input channels, n = 2 sets, deterministic DDIM from an initial index of 250 in 10 steps, alpha 0.9);
where the text lost them (cell sizes, scales, filter size) they are ddad's choices, measured in BENCHMARKS.md.
:data:`CPU_REFINEMENT` is the profile a CPU trains by default (64 px, the compact UNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ...backbones import BACKBONES
from ...config import RunSettings
from ...data.formats import DataConfig
from ...diffusion.schedule import ScheduleConfig
from ...diffusion.unet import UNetConfig
from ...engine.recipe import TrainConfig, check_trained_timestep
from ...memory_bank import BankConfig
from ...runs import WeightsConfig
from ...runtime import PRECISIONS, RuntimeConfig

# UniAD's training (no warm-up, no EMA; the diffusion-only settings of TrainConfig do not apply).
UNIAD_TRAINING = {"epochs": 1000, "batch_size": 64, "lr": 1e-4, "weight_decay": 1e-4, "optimizer": "adamw",
                  "warmup_steps": 0, "grad_clip": 0.1, "ema_decay": 0.0, "lr_decay_epochs": (800,),
                  "lr_decay": 0.1, "checkpoint_every": 50}
RECIPES = {"default": UNIAD_TRAINING, "paper": UNIAD_TRAINING}


# The base heatmap: the transformer's reconstruction error (the paper, Eq. 2), or each token's distance to the
# nearest training token of a memory bank (PatchCore's nearest neighbour on DRDC's own token features; nothing
# to train, so a run with the bank trains only the refiner).
BASES = ("transformer", "bank")


@dataclass(frozen=True)
class FeatureConfig:
    """The frozen backbone's features that the transformer reconstructs."""

    backbone: str = "efficientnet_b4"
    strides: tuple[int, ...] = (2, 4, 8, 16)  # the stages used, each resized (bilinear) to grid x grid
    grid: int = 14  # the token grid (stride 16 of 224)
    base: str = "transformer"  # the base map: "transformer" (Eq. 2) or "bank" (distance to the nearest token)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.base not in BASES:
            raise ValueError(f"features.base must be one of {', '.join(BASES)}, got {self.base!r}")
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
    # dropout on the attention weights; None: ``dropout`` (UniAD's). 0 lets the attention run fused, several
    # times faster on a CPU (BENCHMARKS.md, "The transformer base's speed")
    attention_dropout: float | None = None
    neighbour: int = 7  # a token may not attend to its own k x k neighbourhood (0: no mask)
    jitter_scale: float = 20.0  # training only: noise of each token's norm / channels, times this
    jitter_prob: float = 1.0  # chance that a training batch is jittered

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.neighbour < 0 or (self.neighbour and self.neighbour % 2 == 0):
            raise ValueError(f"neighbour must be 0 or odd, got {self.neighbour}")
        for name in ("dropout", "attention_dropout"):
            p = getattr(self, name)
            if p is not None and not 0 <= p < 1:
                raise ValueError(f"model.{name} must lie in [0, 1), got {p}")
        if min(self.encoder_layers, self.decoder_layers) < 1:
            raise ValueError("the transformer needs at least one encoder and one decoder layer")
        if not 0 <= self.jitter_prob <= 1 or self.jitter_scale < 0:
            raise ValueError(f"jitter_prob must be in [0, 1] and jitter_scale >= 0, got {self.jitter_prob}, "
                             f"{self.jitter_scale}")

    @property
    def attention_dropout_p(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout


@dataclass(frozen=True)
class RefineConfig:
    """The diffusion refinement's network and masks (Sec. 4.2-4.3): a DDPM UNet (DDAD's module) that inpaints
    hidden cells of the image resized to ``image_size``. Cells are in pixels at that size."""

    enabled: bool = True  # False: the base model alone (Table 5's first column)
    image_size: int = 224
    unet: str = "ddad"  # a UNet preset (ddad, ddad-s, compact, tiny)
    model_conditioning: bool = True  # the masked image c as extra input channels (Eq. 10)
    cells: tuple[int, ...] = (8, 16)  # inpainting grid sizes g; each is one inpainting specification
    sets: int = 2  # n disjoint sets per specification (the paper's optimum)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        if not self.cells or any(c < 1 or self.image_size % c for c in self.cells):
            raise ValueError(f"refine.cells {list(self.cells)} must be sizes that divide refine.image_size "
                             f"({self.image_size})")
        if self.sets < 1:
            raise ValueError(f"refine.sets must be >= 1, got {self.sets}")

    def unet_config(self, channels: int) -> UNetConfig:
        """The UNet: the preset at ``image_size``, with ``channels`` condition channels when model-conditioned."""
        unet = UNetConfig.preset(self.unet, self.image_size, channels)
        return replace(unet, cond_channels=channels if self.model_conditioning else 0)


# What a CPU trains by default: 64 px with the compact UNet (DDAD's CPU choice), cells of 4 and 8 pixels
# (about 14 and 28 px at 224: below and at the base model's 16-px token), a 3 x 3 mean filter.
CPU_REFINEMENT = {"refine": {"image_size": 64, "unet": "compact", "cells": (4, 8)}, "detect": {"mean_filter": 3}}

# What a CPU trains the transformer with by default: no dropout on the attention weights, so the attention
# runs fused (2.2 times the steps per minute at hidden 128; the 13 categories after 135 steps: 0.518 / 0.768 /
# 0.429 against UniAD's 0.1's 0.517 / 0.768 / 0.428, BENCHMARKS.md "The transformer base's speed").
CPU_TRANSFORMER = {"model": {"attention_dropout": 0.0}}


# The paper's Table 5 as configurations (overrides of a full DRDC config), in its order of additions.
TABLE5 = {
    "base": {"refine": {"enabled": False}},
    "+test-time conditioning, fusion": {"refine": {"model_conditioning": False},
                                        "detect": {"test_time_conditioning": True, "fusion": True}},
    "+model conditioning": {"refine": {"model_conditioning": True},
                            "detect": {"test_time_conditioning": True, "fusion": True}},
    "+multi-scale base": {"refine": {"model_conditioning": True},
                          "detect": {"test_time_conditioning": True, "fusion": True, "multiscale_base": True}},
}


@dataclass(frozen=True)
class DRDCDetect:
    """How the maps become a score. The base heatmap (Eq. 2) alone, or fused with the diffusion heatmap
    (Eq. 9, 14-17); the image score is the max of the pool x pool average-pooled map (UniAD 16 x 16,
    stride 1). Table 5's switches: ``test_time_conditioning``, ``fusion`` (off: only the final inpainted
    image at full scale, Eq. 9), ``multiscale_base``; model conditioning is a training switch (refine)."""

    pool: int = 16
    crop: float = 1.0  # centre crop of maps and masks for the metrics
    precision: str = "fp32"
    start_step: int = 250  # the initial index T' of the reverse process (of T = 1000)
    steps: int = 10  # deterministic DDIM steps from T'
    test_time_conditioning: bool = True  # known pixels from the input at every step (Eq. 11-13)
    fusion: bool = True  # spatio-temporal: every step's prediction at every scale (Eq. 14-15)
    scales: tuple[int, ...] = (1, 2, 4)  # downsampling factors of Eq. 14
    mean_filter: int = 5  # k of Eq. 16, in pixels of the refinement's images
    alpha: float = 0.9  # weight of the diffusion heatmap (Eq. 17); 0: the base alone, 1: the diffusion alone
    multiscale_base: bool = False  # the base heatmap averaged over ``scales`` too (the paper: no gain)
    calibration_images: int = 16  # defect-free training images that put both maps on one scale
    seed: int = 0  # of every image's masks and noise (with the image's content)

    def __post_init__(self) -> None:
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if not 1 <= self.steps <= self.start_step:
            raise ValueError(f"detect.steps must be in [1, start_step={self.start_step}], got {self.steps}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"detect.alpha must be in [0, 1], got {self.alpha}")
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"detect.scales must be factors >= 1, got {list(self.scales)}")
        if self.mean_filter < 1 or self.mean_filter % 2 == 0:
            raise ValueError(f"detect.mean_filter must be odd and >= 1, got {self.mean_filter}")
        if self.calibration_images < 1:
            raise ValueError(f"detect.calibration_images must be >= 1, got {self.calibration_images}")
        if not 0 < self.crop <= 1:
            raise ValueError(f"crop must be in (0, 1], got {self.crop}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def map_settings(self) -> "DRDCDetect":
        """These settings as far as the two unscaled maps depend on them: not Eq. 17's weight, the pooling
        of the image score or the crop (the key of the calibration scale, so tuning alpha reuses it)."""
        return replace(self, alpha=DRDCDetect.alpha, pool=DRDCDetect.pool, crop=DRDCDetect.crop)


@dataclass(frozen=True)
class DRDCConfig(RunSettings):
    """A DRDC run's config.yaml: one model for all the categories its data names."""

    method: str = "drdc"
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=224))
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**UNIAD_TRAINING))
    refine: RefineConfig = field(default_factory=RefineConfig)
    refine_train: TrainConfig = field(default_factory=TrainConfig)  # DDAD's recipe (t in [0, 250])
    bank: BankConfig = field(default_factory=lambda: BankConfig(per_category=False))  # features.base "bank": one
    # bank for all categories (the unified model), or one per category (each image against its own category's)
    detect: DRDCDetect = field(default_factory=DRDCDetect)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.method != "drdc":
            raise ValueError(f"a DRDC config has method 'drdc', got {self.method!r}")
        if self.refine.enabled:
            if self.detect.start_step >= self.refine.schedule.num_timesteps:
                raise ValueError(f"detect.start_step {self.detect.start_step} is outside the schedule of "
                                 f"{self.refine.schedule.num_timesteps} steps")
            check_trained_timestep(self.refine_train, self.detect.start_step, what="drdc refinement")

    @classmethod
    def upgrade_stored(cls, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """Runs written before the refinement existed (no ``refine`` section) are base models; before
        validation splits, trained on every image."""
        data = dict(data)
        if "refine" not in data:
            data["refine"] = {"enabled": False}
        data["data"] = DataConfig.upgrade_stored(data.get("data"))
        return data

    def with_recipe(self, name: str, **train_overrides: Any) -> "DRDCConfig":
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r} for drdc; choose one of {', '.join(RECIPES)}")
        return replace(self, train=TrainConfig(**{**RECIPES[name], **train_overrides}))
