"""``ddad tune``: choose detection settings on the run's validation split only (held-out defect-free images
and the user's validation defects, else synthetic anomalies on the held-out images), never on the test split,
and store the choice in the run's config.yaml.

Each candidate is a set of detection settings by name (as :func:`ddad.api.with_detection` takes them); it is
scored on the validation split by the mean of image and pixel AUROC there (pixel AUROC alone where the
validation images have no masks, image AUROC alone where they have no defects of either kind). Ties keep the
earlier candidate, so the run's current settings (listed first) stay unless another one is better.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..data.splits import load_validation_split
from ..metrics import pixel_auroc, roc_auc
from ..runs import RunDir
from ..scoring import crop
from .detection import LoadedDetector

# What ``ddad tune`` tries by default, per method: detection settings by name -> values.
GRIDS: dict[str, dict[str, tuple]] = {
    "ddad": {"mode": ("pixel", "feature", "combined"), "v": (0.5, 1.0, 2.0), "w": (1.0, 3.0, 5.0)},
    "drdc": {"alpha": (0.5, 0.7, 0.9, 1.0), "start_step": (150, 250)},
}


def current_values(config: Any, names: Sequence[str]) -> dict[str, Any]:
    """The config's detection settings of these names (found anywhere under ``detect``)."""
    found: dict[str, Any] = {}

    def visit(obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                visit(value)
            elif f.name in names:
                found[f.name] = value

    visit(config.detect)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"no detection setting named {', '.join(missing)} in a {config.method} run")
    return found


def candidates(grid: Mapping[str, Sequence[Any]], current: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The current settings first, then every combination of the grid (without repeating the current one)."""
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    first = {k: current[k] for k in grid}
    return [first] + [c for c in combos if c != first]


def validation_score(loaded: LoadedDetector, split) -> dict[str, float | None]:
    """Image and pixel AUROC of ``loaded`` on a validation split, and the objective (their mean)."""
    result = loaded.score_split(split, True, False)
    image = roc_auc(result.pred_score.numpy(), split.labels) if split.labels.any() else None
    pixel = None
    if split.has_masks:
        pixel = pixel_auroc(crop(result.anomaly_map, loaded.crop)[:, 0], crop(split.masks, loaded.crop)[:, 0] > 0.5)
    parts = [v for v in (image, pixel) if v is not None]
    return {"image_auroc": image, "pixel_auroc": pixel, "objective": float(np.mean(parts)) if parts else None}


def tune(run: RunDir, config: Any, load: Callable[[Any], LoadedDetector], with_settings: Callable[..., Any],
         grid: Mapping[str, Sequence[Any]], current: Mapping[str, Any], progress: bool = True
         ) -> tuple[Any, list[dict]]:
    """(the config with the best candidate's settings, one row per candidate). ``load`` turns a config into
    its detector; ``with_settings(config, **candidate)`` applies a candidate."""
    from tqdm.auto import tqdm

    split = load_validation_split(config.data, progress=False, log=run.log)
    if split is None:
        raise ValueError(f"run {run.root} holds out no validation images (data.val_ratio is 0 and no "
                         "val_abnormal_dir): retrain with --val-ratio, or add --val-abnormal-dir")
    rows, best, best_value = [], config, -np.inf
    for candidate in tqdm(candidates(grid, current), desc="tune", unit="setting", disable=not progress):
        tried = with_settings(config, **candidate)
        row = {**candidate, **validation_score(load(tried), split)}
        rows.append(row)
        if row["objective"] is not None and row["objective"] > best_value:
            best, best_value = tried, row["objective"]
    return best, rows
