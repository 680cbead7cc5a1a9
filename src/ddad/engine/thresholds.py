"""Decisions from data a user may see: thresholds chosen on a validation split (never on the test split),
normalised scores as anomalib defines them, and what a stored threshold does on labelled images.

    image threshold   for a target false-alarm rate r on defect-free validation images: the smallest
                      threshold at which at most floor(r n) of the n good scores are at or above it; or
                      F1-optimal on validation defects (real ones, else synthetic)
    pred_score        min(max((s - threshold) / (max - min) + 0.5, 0), 1), min and max of the validation
                      scores: 0.5 exactly at the threshold, monotone in s (anomalib's min-max normalisation)
    pred_label        s >= threshold
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..metrics import f1_optimal_threshold


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


def choose_threshold(scores, labels, max_false_alarms: float | None = None, defects: str = "real") -> Threshold:
    """From validation ``scores`` and ``labels`` (0 good, 1 defective): for a false-alarm target on the good
    ones, or F1-optimal where there are defects. ``defects`` names where the defects came from."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    good = scores[~labels]
    if max_false_alarms is not None or not labels.any():
        rate = 0.0 if max_false_alarms is None else max_false_alarms
        value = false_alarm_threshold(good, rate)
        source = f"false alarms <= {rate:g} on {good.size} good validation images"
        target = {"max_false_alarms": rate}
    else:
        value = f1_optimal_threshold(scores, labels)
        if value is None:
            raise ValueError("an F1-optimal threshold needs good and defective validation images")
        source = f"F1-optimal on validation ({good.size} good, {int(labels.sum())} {defects} defective)"
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
