"""Decisions from stored thresholds, without torch: ``pred_label`` (score >= threshold), ``pred_score``
(anomalib's min-max normalisation, 0.5 exactly at the threshold) and ``pred_mask`` (map >= the pixel
threshold), each image by its category's decision where the run chose one per category. ``ddad`` decides
through the same code (:class:`ddad.engine.thresholds.Decisions`), so an exported model labels exactly as
the run; how thresholds are chosen on validation images stays in ``ddad``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class Threshold:
    """A decision threshold and where it came from, with the validation range that normalises scores."""

    value: float
    source: str  # e.g. "false alarms <= 0.01 on 80 good validation images"
    target: dict  # {"max_false_alarms": 0.01} or {"f1": "validation defects (synthetic)"}
    low: float  # min and max of the validation scores
    high: float

    def to_dict(self) -> dict:
        return asdict(self)

    def normalise(self, scores):
        """anomalib's min-max normalisation: 0.5 exactly at the threshold, clipped to [0, 1]."""
        span = max(self.high - self.low, 1e-12)
        return np.clip((np.asarray(scores, dtype=np.float64) - self.value) / span + 0.5, 0.0, 1.0)

    def label(self, scores) -> np.ndarray:
        return np.asarray(scores, dtype=np.float64) >= self.value


@dataclass(frozen=True)
class Decision:
    """The thresholds of one group of images: the image threshold (``pred_label``, ``pred_score``) and the
    pixel threshold (``pred_mask``) where validation masks exist."""

    image: Threshold
    pixel: Threshold | None = None

    def to_dict(self) -> dict:
        """As threshold.json stores it (the image threshold's fields at the top, as earlier versions wrote)."""
        image, pixel = self.image, self.pixel
        return {"threshold": image.value, "source": image.source, "target": image.target,
                "validation_range": [image.low, image.high],
                "pixel_threshold": None if pixel is None else pixel.value,
                "pixel_source": None if pixel is None else pixel.source}

    @classmethod
    def from_dict(cls, stored: Mapping) -> "Decision":
        """From threshold.json's fields; a record without a validation range (a test-split oracle, or an
        older version's) normalises nothing: its range is empty (see :meth:`Decisions.normalises`)."""
        value = float(stored["threshold"])
        low, high = stored.get("validation_range") or (value, value)
        image = Threshold(value, stored.get("source", ""), stored.get("target") or {}, float(low), float(high))
        pixel = None
        if stored.get("pixel_threshold") is not None:
            pv = float(stored["pixel_threshold"])
            pixel = Threshold(pv, stored.get("pixel_source") or "", {}, pv, pv)
        return cls(image, pixel)


@dataclass(frozen=True)
class DecisionTable:
    """The shared decision and one per category (each chosen on that category's validation images)."""

    shared: Decision
    categories: dict[str, Decision] = field(default_factory=dict)
    normalises: bool = True  # False: no validation range was stored, pred_score is left empty

    def of(self, category: str | None) -> Decision:
        """The category's own decision where it has one, else the shared one."""
        return self.categories.get(category, self.shared) if category is not None else self.shared

    def thresholds(self, categories: Sequence[str | None]) -> np.ndarray:
        """Each image's image threshold, by its category."""
        return np.array([self.of(c).image.value for c in categories], dtype=np.float64)

    def to_dict(self) -> dict:
        return {**self.shared.to_dict(), "categories": {c: d.to_dict() for c, d in self.categories.items()}}

    def decide(self, scores, maps=None, categories: Sequence[str | None] | None = None) -> dict:
        """Each image decided by its category's decision (``categories[i]``; None: the shared one): ``pred_label``
        (N,) bool, ``pred_score`` (N,) float32 (None when no validation range was stored) and, given ``maps``
        (N, ...), ``pred_mask`` (map >= the category's pixel threshold, else the shared one; None without
        pixel thresholds)."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        categories = list(categories) if categories is not None else [None] * len(scores)
        if len(categories) != len(scores):
            raise ValueError(f"{len(categories)} categories for {len(scores)} images")
        decided = [self.of(c) for c in categories]
        label = np.array([bool(d.image.label(s)) for d, s in zip(decided, scores)], dtype=bool)
        pred_score = None
        if self.normalises:
            pred_score = np.array([float(d.image.normalise(s)) for d, s in zip(decided, scores)], dtype=np.float32)
        pred_mask = None
        pixels = [d.pixel or self.shared.pixel for d in decided]
        if maps is not None and all(t is not None for t in pixels):
            maps = np.asarray(maps)
            limits = np.array([t.value for t in pixels], dtype=np.float64).reshape(-1, *([1] * (maps.ndim - 1)))
            pred_mask = maps.astype(np.float64) >= limits
        return {"pred_label": label, "pred_score": pred_score, "pred_mask": pred_mask}

    @classmethod
    def from_stored(cls, stored: Mapping):
        return cls(Decision.from_dict(stored), {c: Decision.from_dict(d) for c, d in
                                                (stored.get("categories") or {}).items()},
                   normalises=bool(stored.get("validation_range")))
