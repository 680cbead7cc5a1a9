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

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from ddad_infer.decisions import Decision, DecisionTable, Threshold  # noqa: F401 (ddad's names)

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


class Decisions(DecisionTable):
    """The shared decision and one per category, applied to an :class:`AnomalyResult` (the decisions
    themselves: :class:`ddad_infer.decisions.DecisionTable`, shared with the exported models' runtime)."""

    def apply(self, result: AnomalyResult, categories: Sequence[str | None] | None = None,
              masks: bool = True) -> AnomalyResult:
        """``result`` with each image decided by its category's decision (``categories[i]``; None: the
        shared one): ``pred_label`` (score >= threshold), ``pred_score`` normalised (left None when no
        validation range was stored) and ``pred_mask`` (anomaly map >= the category's pixel threshold, else
        the shared one; None without pixel thresholds, or without ``masks``)."""
        if categories is not None and len(categories) != len(result):
            raise ValueError(f"{len(categories)} categories for {len(result)} images")
        out = self.decide(result.score.double().numpy(), result.anomaly_map.numpy() if masks else None, categories)
        as_tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        return replace(result, pred_score=as_tensor(out["pred_score"]), pred_label=as_tensor(out["pred_label"]),
                       pred_mask=as_tensor(out["pred_mask"]))


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
