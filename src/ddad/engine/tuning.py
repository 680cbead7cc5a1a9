"""``ddad tune``: choose detection settings on the run's validation split only (held-out defect-free images
and the user's validation defects, else synthetic anomalies on the held-out images), never on the test split,
and store the choice in the run's config.yaml.

Each candidate is a set of detection settings by name (found anywhere under the config's ``detect``); it is
scored on the validation split by the mean of image and pixel AUROC there (pixel AUROC alone where the
validation images have no masks, image AUROC alone where they have no defects of either kind). Ties keep the
earlier candidate, so the run's current settings (listed first) stay unless another one is better.

A search space is one or more grids, each the product of its values; a name a grid does not list keeps the
run's value, so that settings which do not matter in a mode (DDAD's v in pixel scoring) are not tried there.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import override
from ..data.splits import load_validation_split
from ..metrics import pixel_auroc, roc_auc
from ..runs import RunDir
from ..scoring import crop
from .detection import LoadedDetector

Grid = Mapping[str, Sequence[Any]]

# What ``ddad tune`` tries by default, per method. DDAD: the conditioning weight w (Eq. 7) in every mode; the
# backbone's input size (None: the image's own) where features are used; v (Eq. 9) where both are combined.
_W, _V, _FEATURE_SIZE = (1.0, 3.0, 5.0), (0.5, 1.0, 2.0), (None, 224)
GRIDS: dict[str, tuple[Grid, ...]] = {
    "ddad": ({"mode": ("pixel",), "w": _W},
             {"mode": ("feature",), "w": _W, "feature_size": _FEATURE_SIZE},
             {"mode": ("combined",), "w": _W, "v": _V, "feature_size": _FEATURE_SIZE},
             # Eq. 8 against the nearest training patch of a bank instead of the reconstruction (its pixel term
             # still the diffusion's)
             {"mode": ("combined",), "reference": ("bank",), "w": _W, "v": _V}),
    # alpha 0 is the base alone: validation can refuse a refinement that does not help (a memory-bank base with
    # a refiner of 10 CPU minutes lost to its base: BENCHMARKS.md)
    "drdc": ({"alpha": (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), "start_step": (150, 250)},),
    "patchcore": ({"sigma": (2.0, 4.0, 8.0)},),  # the smoothing of the map (the paper's 4)
}


def parse_grid(items: Sequence[str]) -> dict[str, tuple]:
    """``["NAME=V1,V2", ...]`` (each value parsed as YAML: ``null`` is None) to one grid."""
    import yaml

    from ..config import ConfigError

    grid: dict[str, tuple] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {item!r}: expected NAME=V1,V2")
        grid[name.strip()] = tuple(yaml.safe_load(v) for v in values.split(","))
    return grid


def setting_names(grids: Sequence[Grid]) -> list[str]:
    """Every name some grid lists, in order of first appearance."""
    return list(dict.fromkeys(name for grid in grids for name in grid))


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


def candidates(grids: Sequence[Grid], current: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The current settings first, then every combination of each grid, the names it does not list at their
    current values (each candidate once)."""
    first = dict(current)
    out = [first]
    for grid in grids:
        for values in itertools.product(*grid.values()):
            candidate = {**current, **dict(zip(grid, values))}
            if candidate not in out:
                out.append(candidate)
    return out


def with_candidate(config: Any, candidate: Mapping[str, Any]) -> Any:
    """``config`` with a candidate's detection settings (None is a value here: ``feature_size=None``)."""
    return override(config, candidate, within=("detect",), ignore_none=False)


def validation_score(loaded: LoadedDetector, split) -> dict[str, float | None]:
    """Image and pixel AUROC of ``loaded`` on a validation split, and the objective (their mean)."""
    result = loaded.score_split(split, True, False)
    image = roc_auc(result.score.numpy(), split.labels) if split.labels.any() else None
    pixel = None
    if split.has_masks:
        pixel = pixel_auroc(crop(result.anomaly_map, loaded.crop)[:, 0], crop(split.masks, loaded.crop)[:, 0] > 0.5)
    parts = [v for v in (image, pixel) if v is not None]
    return {"image_auroc": image, "pixel_auroc": pixel, "objective": float(np.mean(parts)) if parts else None}


def search(config: Any, load: Callable[[Any], LoadedDetector], grids: Sequence[Grid], split,
           progress: bool = True) -> tuple[Any, list[dict]]:
    """(the config with the candidate best on ``split``, one row per candidate); ties keep the earlier one.
    ``load`` turns a config into its detector."""
    from tqdm.auto import tqdm

    current = current_values(config, setting_names(grids))
    rows, best, best_value = [], config, -np.inf
    # smoothing 0: the ETA from the mean time per setting so far, not from the last ones (settings that only
    # re-weigh maps already computed, e.g. DRDC's alpha, take a fraction of a second, the others minutes)
    bar = tqdm(candidates(grids, current), desc="tune (settings on validation)", unit="setting", smoothing=0,
               disable=not progress, dynamic_ncols=True)
    for candidate in bar:
        bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in candidate.items()))
        tried = with_candidate(config, candidate)
        row = {**candidate, **validation_score(load(tried), split)}
        rows.append(row)
        if row["objective"] is not None and row["objective"] > best_value:
            best, best_value = tried, row["objective"]
    return best, rows


def tune(run: RunDir, config: Any, load: Callable[[Any], LoadedDetector], grids: Sequence[Grid],
         progress: bool = True) -> tuple[Any, list[dict]]:
    """:func:`search` on the run's validation split (an error naming the remedy where it has none)."""
    split = load_validation_split(config.data, progress=False, log=run.log)
    if split is None:
        raise ValueError(f"run {run.root} holds out no validation images (data.val_ratio is 0 and no "
                         "val_abnormal_dir): retrain with --val-ratio, or add --val-abnormal-dir")
    return search(config, load, grids, split, progress)
