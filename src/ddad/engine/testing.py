"""``ddad test`` for any method: score the run's test split, measure, and write what a user reads.

    OUT/metrics.json   :class:`ddad.results.TestMetrics` (overall, per category and their mean)
    OUT/curves.json    the PRO curve
    OUT/scores.csv     image, category, defect_type, label, score (scores written exactly)
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
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_text
from ..data.io import image_size_of
from ..data.splits import TestSplit, load_test_split, load_validation_split
from ..metrics import evaluate, f1_optimal_threshold
from ..results import AnomalyResult, SplitMetrics, TestMetrics, image_panel_name
from ..runs import RunDir
from ..scoring import crop
from ..visualize import colour_range, panel, save_png
from .calibration import store_threshold
from . import distributed
from .detection import LoadedDetector
from .thresholds import Threshold, choose_threshold, decision_stats

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
    scores = result.pred_score.numpy()
    overall = split_metrics(split, scores, result.anomaly_map, crop_fraction, curves)
    names = np.array([s.category for s in split.samples])
    per_category = {c: split_metrics(split, scores, result.anomaly_map, crop_fraction, subset=np.flatnonzero(names == c))
                    for c in split.categories}
    return overall, per_category


def validation_thresholds(run: RunDir, loaded: LoadedDetector, max_false_alarms: float | None = None,
                          progress: bool = True, cache: bool = True) -> tuple[Threshold, Threshold | None] | None:
    """(image threshold, pixel threshold or None) chosen on the run's validation split only; None without
    one. ``max_false_alarms``: the target false-alarm rate (per image, and per good pixel for the pixel
    threshold); None: F1-optimal on the validation defects."""
    val = load_validation_split(loaded.data, progress=progress, log=run.log)
    if val is None:
        return None
    result = loaded.score_split(val, cache, progress)
    defects = "synthetic" if any(s.defect_type == "synthetic" for s in val.samples) else "real"
    image = choose_threshold(result.pred_score.numpy(), val.labels, max_false_alarms, defects)
    pixel = None
    if val.has_masks:
        maps = crop(result.anomaly_map, loaded.crop).numpy().ravel()
        masks = crop(val.masks, loaded.crop).numpy().ravel() > 0.5
        pixel = choose_threshold(maps, masks, max_false_alarms, defects)
    return image, pixel


def threshold_details(image: Threshold, pixel: Threshold | None) -> dict:
    """What threshold.json keeps beside the image threshold: its target, the validation score range that
    normalises scores (``pred_score``), the pixel threshold of ``pred_mask``."""
    return {"target": image.target, "validation_range": [image.low, image.high],
            "pixel_threshold": None if pixel is None else pixel.value,
            "pixel_source": None if pixel is None else pixel.source}


def store_validation_thresholds(run: RunDir, loaded: LoadedDetector, max_false_alarms: float | None = None,
                                progress: bool = True, cache: bool = True) -> tuple[Threshold, Threshold | None]:
    """Choose the thresholds of ``loaded`` on the run's validation split and store them under its calibration
    key, so that ``ddad predict`` decides without a ``ddad test`` (``ddad tune`` does this for the settings it
    chose). The heatmaps' colour scale is left to the next ``ddad test``."""
    chosen = validation_thresholds(run, loaded, max_false_alarms, progress, cache)
    if chosen is None:
        raise ValueError(f"run {run.root} holds out no validation images: no threshold can be chosen without "
                         "the test split")
    image, pixel = chosen
    if distributed.context().is_main:
        store_threshold(run, image.value, image.source, loaded.key, None, threshold_details(image, pixel))
    return image, pixel


def test_run(run: RunDir, loaded: LoadedDetector, out_dir: Path | None = None, save_images: bool = True,
             progress: bool = True, cache: bool = True, max_false_alarms: float | None = None) -> TestMetrics | None:
    """Evaluate ``loaded`` on the run's test split with thresholds chosen on its validation split (see the
    module docstring); writes and returns the metrics (under torchrun: rank 0; the other ranks score their
    share of the images and return None)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir else run.test_dir
    chosen = validation_thresholds(run, loaded, max_false_alarms, progress, cache)  # before the test split is read
    split = load_test_split(loaded.data, progress, run.log)
    result = loaded.score_split(split, cache, progress)  # under torchrun: each image once, on some rank
    if not distributed.context().is_main:
        return None  # rank 0 measures and writes
    scores = result.pred_score.numpy()
    curves: dict = {}
    overall, per_category = measure(split, result, loaded.crop, curves)
    oracle = f1_optimal_threshold(scores, split.labels)
    sizes = Counter(f"{w}x{h}" for h, w in (image_size_of(s.image) for s in split.samples))
    info = {**loaded.info, "image_size": loaded.data.image_size, "original_sizes": dict(sizes.most_common())}
    if oracle is not None:
        info["oracle_threshold"] = {"threshold": oracle, "source": "F1-optimal on the test split",
                                    **decision_stats(scores, split.labels, oracle)}
    if chosen is None:
        threshold, source, details = oracle, THRESHOLD_SOURCE, {}
    else:
        image, pixel = chosen
        threshold, source = image.value, image.source
        details = threshold_details(image, pixel)
        info["decision"] = {"target": image.target, **decision_stats(scores, split.labels, threshold)}
    metrics = TestMetrics(dataset=split.name, overall=overall, categories=per_category, threshold=threshold,
                          threshold_source=source, calibration_key=loaded.key.digest,
                          seconds=time.perf_counter() - t0, settings=loaded.settings, info=info)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.save(out_dir / "metrics.json")
    atomic_write_text(out_dir / "curves.json", json.dumps(curves))
    write_csv(out_dir / "scores.csv", ["image", "category", "defect_type", "label", "score"],
              [(str(s.image), s.category, s.defect_type, s.label, float(v)) for s, v in zip(split.samples, scores)])
    colours = colour_range(result.anomaly_map)
    if threshold is not None:
        store_threshold(run, threshold, source, loaded.key, colours, details)
    if save_images:
        write_panels(split, result, out_dir / "images", colours, threshold, progress)
    return metrics


def write_panels(split: TestSplit, result: AnomalyResult, folder: Path, colours: tuple[float, float],
                 threshold: float | None = None, progress: bool = True) -> None:
    """One PNG per test image, all in the colour scale ``colours`` (the report captions them, so they
    carry no title)."""
    several = len(split.categories) > 1
    for i, s in enumerate(tqdm(split.samples, desc="images", unit="img", disable=not progress, leave=False)):
        mask = split.masks[i] if s.mask is not None or s.label == 0 else None
        recon = None if result.reconstruction is None else result.reconstruction[i]
        name = image_panel_name(s.category if several else "", s.defect_type, s.image)
        save_png(panel(split.images[i], recon, result.anomaly_map[i], mask, None, *colours, threshold=threshold),
                 folder / f"{name}.png")
