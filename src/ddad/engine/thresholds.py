"""Decisions from data a user may see: thresholds chosen on a validation split (never on the test split),
normalised scores as anomalib defines them, and what a stored threshold does on labelled images.

    image threshold   for a target false-alarm rate r on defect-free validation images: the smallest
                      threshold at which at most floor(r n) of the n good scores are at or above it; or
                      F1-optimal on validation defects, where they are real ones
    default           F1 only with real validation defects; otherwise (synthetic defects, or none) a target
                      of r = DEFAULT_MAX_FALSE_ALARMS = 1 %: synthetic defects are far easier than real ones,
                      and F1 on them put the threshold among the good parts' scores (73 to 89 % false alarms
                      on test, issue 28). 1 % because a line stops or re-checks every flagged part; below 100
                      good validation images it puts the threshold above all of them.
    its uncertainty   the threshold is the k-th largest of n good scores (k = floor(r n) + 1), so the share
                      of new good parts at or above it follows Beta(k, n + 1 - k) whatever the scores'
                      law: mean k / (n + 1), and a 95 % interval stated with the threshold (40 images:
                      2.4 %, 0.06 to 8.8 %)
    pred_score        min(max((s - threshold) / (max - min) + 0.5, 0), 1), min and max of the validation
                      scores: 0.5 exactly at the threshold, monotone in s (anomalib's min-max normalisation)
    pred_label        s >= threshold

A model of several categories (DRDC, PatchCore's banks) scores them on different scales: one threshold for
all flags nearly every image of the categories whose scores run high. :class:`Decisions` holds a threshold
and normalisation per category, each chosen on that category's validation images only, beside the shared
one (for images whose category is unknown).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import torch

from ..metrics import f1_optimal_threshold
from ..results import AnomalyResult

DEFAULT_MAX_FALSE_ALARMS = 0.01  # the default target without real validation defects (module docstring)


def false_alarm_threshold(good_scores, rate: float) -> float:
    """The smallest threshold with at most floor(rate * n) of the ``good_scores`` at or above it (defective
    when score >= threshold), i.e. a false-alarm rate <= ``rate`` on these images."""
    s = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise ValueError("a false-alarm threshold needs defect-free validation scores; there are none")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"the false-alarm target must be in [0, 1), got {rate}")
    allowed = int(np.floor(rate * s.size))
    return float(np.nextafter(s[allowed], np.inf))  # above the (allowed + 1)-th largest good score


def false_alarm_interval(n_good: int, rate: float, level: float = 0.95) -> tuple[float, float, float]:
    """(expected, low, high): the false-alarm rate on new good images of :func:`false_alarm_threshold` chosen
    on ``n_good`` images for ``rate``, and its central ``level`` interval (the k-th largest of n exchangeable
    scores leaves a Beta(k, n + 1 - k) share of new ones at or above it, k = floor(rate n) + 1)."""
    from scipy.stats import beta

    k = int(np.floor(rate * n_good)) + 1
    a, b = k, n_good + 1 - k
    tail = (1 - level) / 2
    return k / (n_good + 1), float(beta.ppf(tail, a, b)), float(beta.ppf(1 - tail, a, b))


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


def choose_threshold(scores, labels, max_false_alarms: float | None = None, defects: str = "real",
                     unit: str = "images") -> Threshold:
    """From validation ``scores`` and ``labels`` (0 good, 1 defective) of ``unit`` (images or pixels): for a
    false-alarm target on the good ones (``max_false_alarms``; by default :data:`DEFAULT_MAX_FALSE_ALARMS`
    unless the defects are real), or F1-optimal on real defects. ``defects`` names where they came from."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    good = scores[~labels]
    if max_false_alarms is not None or not labels.any() or defects != "real":
        rate = DEFAULT_MAX_FALSE_ALARMS if max_false_alarms is None else max_false_alarms
        value = false_alarm_threshold(good, rate)
        source = f"false alarms <= {rate:g} on {good.size} good validation {unit}"
        target = {"max_false_alarms": rate}
        if max_false_alarms is None:
            source += f" (the default without real validation defects; {defects} ones {'ignored' if labels.any() else 'absent'})"
            target["default"] = True
        if unit == "images":
            expected, low, high = false_alarm_interval(good.size, rate)
            source += f"; expected on new good images {100 * expected:.2g} %, 95 % interval {100 * low:.2g} to {100 * high:.2g} %"
            target.update(expected_false_alarms=expected, interval_95=[low, high], good_images=int(good.size))
    else:
        value = f1_optimal_threshold(scores, labels)
        if value is None:
            raise ValueError("an F1-optimal threshold needs good and defective validation images")
        source = f"F1-optimal on validation ({good.size} good, {int(labels.sum())} {defects} defective {unit})"
        target = {"f1": f"validation defects ({defects})"}
    return Threshold(value, source, target, float(scores.min()), float(scores.max()))


def decision_stats(scores, labels, threshold: float) -> dict:
    """What ``threshold`` does on labelled images: false-alarm rate, miss rate, precision, recall, F1."""
    predicted = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    labels = np.asarray(labels).astype(bool).ravel()
    tp, fp = int((predicted & labels).sum()), int((predicted & ~labels).sum())
    fn, tn = int((~predicted & labels).sum()), int((~predicted & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"false_alarm_rate": fp / (fp + tn) if fp + tn else None, "miss_rate": fn / (tp + fn) if tp + fn else None,
            "precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


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
class Decisions:
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

    def apply(self, result: AnomalyResult, categories: Sequence[str | None] | None = None,
              masks: bool = True) -> AnomalyResult:
        """``result`` with each image decided by its category's decision (``categories[i]``; None: the
        shared one): ``pred_label`` (score >= threshold), ``pred_score`` normalised (left None when no
        validation range was stored) and ``pred_mask`` (anomaly map >= the category's pixel threshold, else
        the shared one; None without pixel thresholds, or without ``masks``)."""
        categories = list(categories) if categories is not None else [None] * len(result)
        if len(categories) != len(result):
            raise ValueError(f"{len(categories)} categories for {len(result)} images")
        scores = result.score.double().numpy()
        decided = [self.of(c) for c in categories]
        label = torch.tensor([d.image.label(s) for d, s in zip(decided, scores)], dtype=torch.bool)
        pred_score = None
        if self.normalises:
            pred_score = torch.tensor([float(d.image.normalise(s)) for d, s in zip(decided, scores)],
                                      dtype=torch.float32)
        pred_mask = None
        pixels = [d.pixel or self.shared.pixel for d in decided]
        if masks and all(t is not None for t in pixels):
            limits = torch.tensor([t.value for t in pixels], dtype=torch.float64).view(-1, 1, 1, 1)
            pred_mask = result.anomaly_map.double() >= limits
        return replace(result, pred_score=pred_score, pred_label=label, pred_mask=pred_mask)

    @classmethod
    def from_stored(cls, stored: Mapping) -> "Decisions":
        return cls(Decision.from_dict(stored), {c: Decision.from_dict(d) for c, d in
                                                (stored.get("categories") or {}).items()},
                   normalises=bool(stored.get("validation_range")))


def choose_decisions(scores, labels, categories: Sequence[str], maps=None, masks=None,
                     max_false_alarms: float | None = None, defects: str = "real") -> Decisions:
    """The shared decision on all the validation images and, with more than one category, each category's
    from its own images only (``categories[i]`` names image i's). ``maps`` and ``masks`` (N, ...): the pixel
    thresholds too."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    names = np.asarray(list(categories), dtype=object)

    def decide(rows: np.ndarray) -> Decision:
        image = choose_threshold(scores[rows], labels[rows], max_false_alarms, defects)
        pixel = None
        if maps is not None:
            pixel = choose_threshold(np.asarray(maps)[rows].ravel(), np.asarray(masks)[rows].ravel(),
                                     max_false_alarms, defects, unit="pixels")
        return Decision(image, pixel)

    shared = decide(np.arange(len(scores)))
    groups = list(dict.fromkeys(names.tolist()))
    per_category = {}
    for c in groups if len(groups) > 1 else ():
        try:
            per_category[c] = decide(np.flatnonzero(names == c))
        except ValueError:  # e.g. no good validation image of c: its images take the shared decision
            pass
    return Decisions(shared, per_category)


def decision_stats_by_category(scores, labels, categories: Sequence[str | None], decisions: Decisions) -> dict:
    """:func:`decision_stats` with each image decided by its category's threshold."""
    thresholds = decisions.thresholds(categories)
    predicted = np.asarray(scores, dtype=np.float64).ravel() >= thresholds
    return decision_stats(predicted.astype(np.float64), labels, 1.0)
