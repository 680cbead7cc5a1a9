"""DDAD's settings: the detection algorithm, which weights it uses, and the run's config.yaml.

Detection settings come in three parts, so that what changes a score is never mixed with what does not:

- :class:`DetectConfig`, the algorithm: sampler (Alg. 1), scoring (Eq. 8-9), backbone, crop, seed and
  the arithmetic precision (bf16 rounding changes the scores);
- :class:`DDADWeights`, which weights: checkpoint, EMA or raw, the backbone's pretrained file, the
  domain-adapted extractor (Eq. 10) and its epoch;
- :class:`ddad.runtime.RuntimeConfig`: device, backend, batch size and speed options.

The calibration key, under which score scales and thresholds are stored, is built from the first two
whole (``ddad.engine.calibration``), never from a list of chosen fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from ...backbones import BACKBONES
from ...config import RunSettings, field_names
from ...data.formats import DataConfig
from ...diffusion.sampler import SamplerConfig
from ...diffusion.schedule import ScheduleConfig
from ...diffusion.unet import UNetConfig
from ...engine.recipe import RECIPES, TrainConfig
from ...runs import WeightsConfig
from ...runtime import PRECISIONS, RuntimeConfig
from ...scoring import ScoringConfig


@dataclass(frozen=True)
class DetectConfig:
    """DDAD's detection algorithm (see the module docstring for what is not here)."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    backbone: str = "wide_resnet101_2"
    crop: float = 0.875  # centre crop of map and mask for evaluation (224 of 256)
    seed: int = 0  # of the per-image sampling noise
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast of the networks
    force_timestep: bool = False  # allow a T' above the largest timestep the model was trained on

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if not 0 < self.crop <= 1:
            raise ValueError(f"crop must be in (0, 1], got {self.crop}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def reconstruction_settings(self) -> "DetectConfig":
        """These settings as far as the reconstruction (Alg. 1) depends on them: not the scoring, backbone or
        crop (the key of the cached reconstructions)."""
        return replace(self, scoring=ScoringConfig(), backbone=DetectConfig.backbone, crop=DetectConfig.crop)

    def distance_settings(self) -> "DetectConfig":
        """These settings as far as the distances D_p, D_f depend on them (the key of a score scale): the crop
        and the scoring's combination and smoothing do not change them."""
        return replace(self, crop=DetectConfig.crop, scoring=self.scoring.distance_settings())


@dataclass(frozen=True)
class DDADWeights(WeightsConfig):
    adapted: bool = True  # use the run's domain-adapted extractor when it has one
    adapted_epoch: int | None = None  # which adaptation epoch (None: the last)


@dataclass(frozen=True)
class AdaptConfig:
    epochs: int = 0  # 0: no adaptation (the paper's tables give the per-category count)
    batch_size: int = 16  # split into halves: inputs x and targets y
    lr: float = 1e-4
    weight_decay: float = 0.01  # AdamW's default
    lambda_dl: float = 0.1  # 0.1 MVTec, 0.01 VisA
    w: float = 3.0  # w_DA
    start_step: int = 250  # T'_DA
    skip: int = 25
    eta: float = 1.0
    layers: tuple[int, ...] = (1, 2, 3)  # J
    # BatchNorm running statistics: frozen at ImageNet's (ddad's default), or following the adaptation
    # batches as in the authors' code (``--recipe paper``). On MTD and KolektorSDD at 64 px, following them
    # moved the features far from ImageNet's and lowered every metric; frozen, adaptation helped
    # (BENCHMARKS.md, "Sample-efficient training").
    train_batchnorm: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"adapt epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError(f"adapt batch_size must be even and >= 2 (two halves), got {self.batch_size}")
        if self.lambda_dl < 0:
            raise ValueError(f"lambda_dl must be >= 0, got {self.lambda_dl}")
        if not self.layers or min(self.layers) < 1 or max(self.layers) > 4:
            raise ValueError(f"adapt layers must be within 1..4, got {self.layers}")

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(start_step=self.start_step, skip=self.skip, w=self.w, eta=self.eta)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DDADConfig(RunSettings):
    """A DDAD run's config.yaml."""

    method: str = "ddad"
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig.ddad)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    weights: DDADWeights = field(default_factory=DDADWeights)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    def __post_init__(self) -> None:
        if self.method != "ddad":
            raise ValueError(f"a DDAD config has method 'ddad', got {self.method!r}")

    def with_recipe(self, name: str, **train_overrides: Any) -> "DDADConfig":
        """This config trained with recipe ``name`` (:data:`ddad.engine.trainer.RECIPES`). The paper's recipe
        also adapts the extractor as the authors' code does, with BatchNorm statistics following the data."""
        return self.replace(train=TrainConfig.recipe(name, **train_overrides),
                            adapt=replace(self.adapt, train_batchnorm=name == "paper"))

    @classmethod
    def upgrade(cls, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """Mappings in the layouts of earlier versions:

        - ``detect.scoring.normalize_over_batch`` (a bool) became ``normalization``; such a run keeps the
          normalisation it was evaluated with;
        - ``detect`` held the runtime and weight settings too (0.1.0): each key moves to the section whose
          class has a field of its name (``detect.weights`` is ``weights.average``)."""
        data = dict(data)
        detect = data.get("detect")
        if not isinstance(detect, Mapping):
            return data
        detect = dict(detect)
        scoring = detect.get("scoring")
        if isinstance(scoring, Mapping) and "normalize_over_batch" in scoring:
            scoring = dict(scoring)
            over_batch = scoring.pop("normalize_over_batch")
            scoring.setdefault("normalization", "batch" if over_batch else "image")
            detect["scoring"] = scoring
        if "weights" in detect and not isinstance(detect["weights"], Mapping):
            detect["average"] = detect.pop("weights")
        moved = {"runtime": field_names(RuntimeConfig), "weights": field_names(DDADWeights)}
        for section, names in moved.items():
            keys = [k for k in detect if k in names and k not in field_names(DetectConfig)]
            if keys:
                data[section] = {**dict(data.get(section) or {}), **{k: detect.pop(k) for k in keys}}
        data["detect"] = detect
        return data

    @classmethod
    def upgrade_stored(cls, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """A run directory's config.yaml: runs written before ddad had recipes were trained with the
        paper's (their ``train`` section has no ``optimizer``); before validation splits, on every image."""
        data = dict(data)
        train = data.get("train") or {}
        if "optimizer" not in train:
            data["train"] = {**RECIPES["paper"], **train}
        data["data"] = DataConfig.upgrade_stored(data.get("data"))
        return data
