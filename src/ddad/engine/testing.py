"""``ddad test`` for any method: score the run's test split, measure, and write what a user reads.

    OUT/metrics.json   :class:`ddad.results.TestMetrics` (overall, per category and their mean)
    OUT/curves.json    the PRO curve
    OUT/scores.csv     image, category, defect_type, label, score (scores written exactly), threshold (the
                       image's), pred_score (normalised as ``ddad predict``'s, where the thresholds came from
                       the validation split), pred_label (score >= threshold)
    OUT/images/        one panel per image: input | reconstruction | heatmap | ground truth
    RUN_DIR/threshold.json   the decision thresholds (image and pixel), under the detector's calibration key

The thresholds are chosen on the run's validation split (:mod:`ddad.engine.thresholds`) before the test
split is read: for a target false-alarm rate on the good validation images, or F1-optimal on validation
defects (real, else synthetic). metrics.json reports what the stored image threshold does on the test set
beside the threshold-free metrics, and, apart, the F1-optimal test threshold (an oracle a user cannot have).
A run without a validation split (``val_ratio`` 0 and no validation defects) falls back to that oracle,
and says so in ``threshold_source``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_text
from ..data.io import image_size_of
from ..data.anomalies import synthetic_origin
from ..data.splits import TestSplit, load_test_split, load_validation_split
from ..metrics import evaluate, f1_optimal_threshold
from ..results import AnomalyResult, SplitMetrics, TestMetrics, image_panel_name
from ..runs import RunDir
from ..scoring import crop
from ..visualize import colour_range, panel, save_png
from .calibration import store_threshold
from . import distributed
from .detection import LoadedDetector
from .recognition import build_recogniser
from .thresholds import Decisions, choose_decisions, decision_stats, decision_stats_by_category

THRESHOLD_SOURCE = "F1-optimal on the test split (no validation split: an oracle threshold)"


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Pass scores as floats: csv writes them exactly (repr), so comparing them with threshold.json gives
    the same decisions as the run made."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def split_metrics(split: TestSplit, scores: np.ndarray, maps, crop_fraction: float, curves: dict | None = None,
                  subset: np.ndarray | None = None) -> SplitMetrics:
    """The threshold-free metrics of the split (or of the images ``subset`` of it), maps and masks
    centre-cropped to ``crop_fraction``."""
    idx = np.arange(len(scores)) if subset is None else subset
    cropped_maps = crop(maps[idx], crop_fraction)[:, 0]
    cropped_masks = crop(split.masks[idx], crop_fraction)[:, 0] > 0.5
    values = evaluate(scores[idx], split.labels[idx], cropped_maps, cropped_masks, split.has_masks, curves)
    return SplitMetrics(**values, n_images=int(len(idx)), n_defective=int(split.labels[idx].sum()))


def measure(split: TestSplit, result: AnomalyResult, crop_fraction: float, curves: dict | None = None
            ) -> tuple[SplitMetrics, dict[str, SplitMetrics]]:
    """Metrics of the whole split and of each of its categories."""
    scores = result.score.numpy()
    overall = split_metrics(split, scores, result.anomaly_map, crop_fraction, curves)
    names = np.array([s.category for s in split.samples])
    per_category = {c: split_metrics(split, scores, result.anomaly_map, crop_fraction, subset=np.flatnonzero(names == c))
                    for c in split.categories}
    return overall, per_category


def validation_thresholds(run: RunDir, loaded: LoadedDetector, max_false_alarms: float | None = None,
                          progress: bool = True, cache: bool = True) -> Decisions | None:
    """The image and pixel thresholds chosen on the run's validation split only, shared and (with several
    categories) each category's from its own validation images; None without a validation split.
    ``max_false_alarms``: the target false-alarm rate (per image, and per good pixel for the pixel
    threshold); None: F1-optimal on the validation defects."""
    val = load_validation_split(loaded.data, progress=progress, log=run.log)
    if val is None:
        return None
    result = loaded.score_split(val, cache, progress)
    defects = "synthetic" if any(synthetic_origin(s) for s in val.samples) else "real"
    maps = masks = None
    if val.has_masks:
        maps = crop(result.anomaly_map, loaded.crop).flatten(1).numpy()
        masks = crop(val.masks, loaded.crop).flatten(1).numpy() > 0.5
    return choose_decisions(result.score.numpy(), val.labels, [s.category for s in val.samples], maps, masks,
                            max_false_alarms, defects)


def store_validation_thresholds(run: RunDir, loaded: LoadedDetector, max_false_alarms: float | None = None,
                                progress: bool = True, cache: bool = True) -> Decisions:
    """Choose the thresholds of ``loaded`` on the run's validation split and store them under its calibration
    key, so that ``ddad predict`` decides without a ``ddad test`` (``ddad tune`` does this for the settings it
    chose). The heatmaps' colour scale is left to the next ``ddad test``."""
    decisions = validation_thresholds(run, loaded, max_false_alarms, progress, cache)
    if decisions is None:
        raise ValueError(f"run {run.root} holds out no validation images: no threshold can be chosen without "
                         "the test split")
    if distributed.context().is_main:
        store_threshold(run, decisions.to_dict(), loaded.key)
    return decisions


def recognition_accuracy(run: RunDir, loaded: LoadedDetector, split: TestSplit, progress: bool = True) -> dict | None:
    """How often the run's category recognition names a test image's own category (None: one category, or a
    method without a global feature)."""
    if loaded.embed is None or len(split.categories) < 2:
        return None
    recogniser = build_recogniser(run, loaded.data, loaded.embed, loaded.embed_identity, loaded.batch_size, progress)
    if recogniser is None:
        return None
    truth = [s.category for s in split.samples]
    named = recogniser(split.images)
    confused = Counter((t, n) for t, n in zip(truth, named) if t != n)
    return {"accuracy": float(np.mean([t == n for t, n in zip(truth, named)])), "images": len(truth),
            "references": len(recogniser.labels), "method": "nearest training image by the backbone's pooled "
            "features (cosine)", "confused": [{"category": t, "recognised_as": n, "images": k}
                                              for (t, n), k in confused.most_common()]}


def test_run(run: RunDir, loaded: LoadedDetector, out_dir: Path | None = None, save_images: bool = True,
             progress: bool = True, cache: bool = True, max_false_alarms: float | None = None) -> TestMetrics | None:
    """Evaluate ``loaded`` on the run's test split with thresholds chosen on its validation split (see the
    module docstring); writes and returns the metrics (under torchrun: rank 0; the other ranks score their
    share of the images and return None)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else run.test_dir
    for warning in loaded.info.get("undertrained") or ():  # kept in metrics.json's info too
        print(f"warning: {warning}", file=sys.stderr)
    chosen = validation_thresholds(run, loaded, max_false_alarms, progress, cache)  # before the test split is read
    split = load_test_split(loaded.data, progress, run.log)
    result = loaded.score_split(split, cache, progress)  # under torchrun: each image once, on some rank
    if not distributed.context().is_main:
        return None  # rank 0 measures and writes
    scores = result.score.numpy()
    curves: dict = {}
    overall, per_category = measure(split, result, loaded.crop, curves)
    oracle = f1_optimal_threshold(scores, split.labels)
    sizes = Counter(f"{w}x{h}" for h, w in (image_size_of(s.image) for s in split.samples))
    info = {**loaded.info, "image_size": loaded.data.image_size, "original_sizes": dict(sizes.most_common())}
    if oracle is not None:
        info["oracle_threshold"] = {"threshold": oracle, "source": "F1-optimal on the test split",
                                    **decision_stats(scores, split.labels, oracle)}
    names = [s.category for s in split.samples]
    record = None if oracle is None else {"threshold": oracle, "source": THRESHOLD_SOURCE}
    thresholds = np.full(len(scores), np.nan if oracle is None else oracle)
    if chosen is not None:
        record, image = chosen.to_dict(), chosen.shared.image
        thresholds = chosen.thresholds(names)
        info["decision"] = {"target": image.target, "per_category_thresholds": bool(chosen.categories),
                            **decision_stats_by_category(scores, split.labels, names, chosen)}
        if chosen.categories:
            info["decision_shared_threshold"] = {"target": image.target,
                                                 **decision_stats(scores, split.labels, image.value)}
            info["category_thresholds"] = {c: d.image.value for c, d in chosen.categories.items()}
    recognition = recognition_accuracy(run, loaded, split, progress)
    if recognition is not None:
        info["category_recognition"] = recognition
    threshold, source = (None, THRESHOLD_SOURCE) if record is None else (record["threshold"], record["source"])
    metrics = TestMetrics(dataset=split.name, overall=overall, categories=per_category, threshold=threshold,
                          threshold_source=source, calibration_key=loaded.key.digest,
                          seconds=time.perf_counter() - t0, settings=loaded.settings, info=info)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.save(out_dir / "metrics.json")
    atomic_write_text(out_dir / "curves.json", json.dumps(curves))
    # pred_score normalised by the validation range where the decisions came from validation (as predict)
    normalised = None
    if chosen is not None and chosen.normalises:
        normalised = chosen.apply(result, names, masks=False).pred_score
    blank = lambda v: "" if v is None else v  # noqa: E731
    write_csv(out_dir / "scores.csv", ["image", "category", "defect_type", "label", "score", "threshold",
                                       "pred_score", "pred_label"],
              [(str(s.image), s.category, s.defect_type, s.label, float(v), "" if np.isnan(t) else float(t),
                blank(None if normalised is None else float(normalised[i])), "" if np.isnan(t) else int(v >= t))
               for i, (s, v, t) in enumerate(zip(split.samples, scores, thresholds))])
    colours = colour_range(result.anomaly_map)
    if record is not None:
        store_threshold(run, record, loaded.key, colours)
    if save_images:
        write_panels(split, result, out_dir / "images", colours, None if record is None else thresholds, progress)
    return metrics


def write_panels(split: TestSplit, result: AnomalyResult, folder: Path, colours: tuple[float, float],
                 thresholds: Sequence[float] | None = None, progress: bool = True) -> None:
    """One PNG per test image, all in the colour scale ``colours``, each marked with its own threshold (the
    report captions them, so they carry no title)."""
    several = len(split.categories) > 1
    for i, s in enumerate(tqdm(split.samples, desc="images", unit="img", disable=not progress, leave=False)):
        mask = split.masks[i] if s.mask is not None or s.label == 0 else None
        recon = None if result.reconstruction is None else result.reconstruction[i]
        name = image_panel_name(s.category if several else "", s.defect_type, s.image)
        threshold = None if thresholds is None else float(thresholds[i])
        save_png(panel(split.images[i], recon, result.anomaly_map[i], mask, None, *colours, threshold=threshold),
                 folder / f"{name}.png")
