"""The typed results every method returns and every command writes or reads.

:class:`AnomalyResult` uses anomalib's field names where they mean the same (``pred_score``,
``pred_label``, ``anomaly_map``, ``pred_mask``), plus the raw ``score`` every method computes, the
defect-free ``reconstruction`` where a method makes one and ``extras`` for what is a method's own (DDAD: its
pixel and feature distances). As in anomalib and in scores.csv, ``pred_score`` is the *normalised* score
(0.5 at the threshold, in [0, 1]): a method fills ``score`` and the maps, the run's decisions
(:meth:`ddad.engine.thresholds.Decisions.apply`) fill ``pred_score``, ``pred_label`` and ``pred_mask``.
:class:`TestMetrics` is what ``ddad test`` writes to metrics.json and ``ddad report`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import atomic_write_text


@dataclass
class AnomalyResult:
    """One batch's output; every tensor is on the CPU, indexed like the input batch."""

    score: torch.Tensor  # (B,) raw image anomaly score (larger is more anomalous; its scale is the method's)
    anomaly_map: torch.Tensor  # (B, 1, H, W) the heatmap at the input's size
    reconstruction: torch.Tensor | None = None  # (B, C, H, W) in [-1, 1], for methods that reconstruct
    pred_score: torch.Tensor | None = None  # (B,) normalised: 0.5 at the threshold, in [0, 1], once decided
    pred_label: torch.Tensor | None = None  # (B,) bool, once a threshold has been applied
    pred_mask: torch.Tensor | None = None  # (B, 1, H, W) bool, once a pixel threshold has been applied
    extras: dict[str, torch.Tensor | None] = field(default_factory=dict)  # a method's own maps

    def __len__(self) -> int:
        return len(self.score)

    @staticmethod
    def concat(parts: Sequence["AnomalyResult"]) -> "AnomalyResult":
        """The results of consecutive batches as one."""
        if not parts:
            raise ValueError("no results to concatenate")

        def cat(values: list) -> Any:
            return None if values[0] is None else torch.cat(values)

        merged = {f.name: cat([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(AnomalyResult) if f.name != "extras"}
        extras = {k: cat([p.extras[k] for p in parts]) for k in parts[0].extras}
        return AnomalyResult(**merged, extras=extras)


@dataclass
class SplitMetrics:
    """Threshold-free metrics of a set of test images (None where the data cannot give them)."""

    image_auroc: float | None
    pixel_auroc: float | None
    pro: float | None
    n_images: int
    n_defective: int


@dataclass
class TestMetrics:
    """What ``ddad test`` measured: the whole test split, each category, and their mean (the papers'
    table layout), with the threshold it stored and the settings it ran with."""

    dataset: str
    overall: SplitMetrics
    categories: dict[str, SplitMetrics]
    threshold: float | None
    threshold_source: str
    calibration_key: str
    seconds: float
    settings: dict  # the method's detection settings, as plain values
    info: dict = field(default_factory=dict)  # method-specific facts (e.g. which extractor was used)

    @property
    def mean(self) -> SplitMetrics | None:
        """The unweighted mean over categories of each metric (None where a category lacks it)."""
        if not self.categories:
            return None
        values = list(self.categories.values())

        def avg(name: str) -> float | None:
            got = [getattr(v, name) for v in values]
            return None if any(g is None for g in got) else sum(got) / len(got)

        return SplitMetrics(avg("image_auroc"), avg("pixel_auroc"), avg("pro"), sum(v.n_images for v in values),
                            sum(v.n_defective for v in values))

    def to_dict(self) -> dict:
        """metrics.json: the overall metrics at the top level (as earlier versions wrote them), then the rest."""
        mean = self.mean
        return {
            "dataset": self.dataset, **dataclasses.asdict(self.overall),
            "threshold": self.threshold, "threshold_source": self.threshold_source,
            "calibration_key": self.calibration_key,
            "categories": {k: dataclasses.asdict(v) for k, v in self.categories.items()},
            "category_mean": None if mean is None else dataclasses.asdict(mean),
            "seconds": self.seconds, "settings": self.settings, **self.info,
        }

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "TestMetrics":
        data = json.loads(Path(path).read_text())
        split_fields = [f.name for f in dataclasses.fields(SplitMetrics)]
        overall = SplitMetrics(**{k: data.get(k) for k in split_fields})
        categories = {k: SplitMetrics(**v) for k, v in (data.get("categories") or {}).items()}
        known = {f.name for f in dataclasses.fields(cls)} | set(split_fields) | {"category_mean"}
        return cls(dataset=data.get("dataset", ""), overall=overall, categories=categories,
                   threshold=data.get("threshold"), threshold_source=data.get("threshold_source", ""),
                   calibration_key=data.get("calibration_key", ""), seconds=data.get("seconds", 0.0),
                   settings=data.get("settings") or data.get("detect") or {},
                   info={k: v for k, v in data.items() if k not in known and k != "detect"})


def safe_name(text: str) -> str:
    """``text`` with every character but letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def image_panel_name(category: str, defect_type: str, image: Path | str) -> str:
    """The file name (without .png) of a test image's panel: ``ddad test`` writes it, ``ddad report`` reads it."""
    stem = f"{defect_type}_{Path(image).stem}"
    return safe_name(f"{category}_{stem}" if category else stem)
