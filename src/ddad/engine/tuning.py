"""``ddad tune``: choose detection settings on the run's validation split only (held-out defect-free images
and the user's validation defects, else synthetic anomalies on the held-out images), never on the test split,
and store the choice in the run's config.yaml.

Each candidate is a set of detection settings by name (found anywhere under the config's ``detect``); it is
scored on the validation split by the mean of image and pixel AUROC there (pixel AUROC alone where the
validation images have no masks, image AUROC alone where they have no defects of either kind).

The rule (:func:`robust_choice`): with synthetic defects drawn with several seeds, the objective is computed
per seed, and the run's current settings (listed first) stay unless the candidate best on the mean over seeds
beats them by more than the standard error of that mean gain over the seeds (the standard deviation of the
per-seed gains / sqrt(seeds)): a weak signal keeps the defaults. With real validation defects (or one seed) the best candidate
is chosen; ties keep the earlier one.

A search space is one or more grids, each the product of its values; a name a grid does not list keeps the
run's value, so that settings which do not matter in a mode (DDAD's v in pixel scoring) are not tried there.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import override
from ..data.anomalies import synthetic_origin
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


SEEDS = (0, 1, 2)  # the synthetic defects' seeds ``ddad tune`` draws by default
# ... and by default at least this many synthetic defects (further seeds where the held-out images are few):
# about 8 of each of the 8 kinds, so that no kind's and no seed's figure rests on one or two defects
MIN_DEFECTS = 64


def _auroc(result, split, loaded, keep: np.ndarray) -> dict[str, float | None]:
    labels = split.labels[keep]
    image = roc_auc(result.score.numpy()[keep], labels) if labels.any() and not labels.all() else None
    pixel = None
    if split.has_masks and labels.any():
        pixel = pixel_auroc(crop(result.anomaly_map[keep], loaded.crop)[:, 0], crop(split.masks[keep], loaded.crop)[:, 0] > 0.5)
    parts = [v for v in (image, pixel) if v is not None]
    return {"image_auroc": image, "pixel_auroc": pixel, "objective": float(np.mean(parts)) if parts else None}


def validation_score(loaded: LoadedDetector, split) -> dict:
    """Image and pixel AUROC of ``loaded`` on a validation split and the objective (their mean); with
    synthetic defects also per kind and per seed (the good images with that kind's or seed's defects)."""
    result = loaded.score_split(split, True, False)
    out = _auroc(result, split, loaded, np.ones(len(split.labels), dtype=bool))
    origins = [synthetic_origin(s) for s in split.samples]
    if any(origins):
        good = split.labels == 0
        for field, part in (("kinds", 0), ("seeds", 1)):
            values = sorted({o[part] for o in origins if o is not None})
            out[field] = {str(v): _auroc(result, split, loaded, good | np.array([o is not None and o[part] == v
                                                                                    for o in origins]))
                          for v in values}
    return out


def robust_choice(objectives: np.ndarray, factor: float = 1.0) -> tuple[int, dict]:
    """The chosen row of ``objectives`` (candidates, seeds), row 0 the current settings: the best row on the
    mean over seeds where its mean gain over row 0 exceeds ``factor`` times that mean's standard error over the
    seeds (the standard deviation of the per-seed gains / sqrt(seeds); one seed: any gain), else row 0.
    Returns (row, what decided it: the gain, its spread over seeds and its standard error)."""
    objectives = np.asarray(objectives, dtype=float)
    means = objectives.mean(axis=1)
    best = int(np.argmax(means))  # the first of equals
    gain = objectives[best] - objectives[0]
    with np.errstate(invalid="ignore"):  # a current setting without a figure: an infinite gain, no spread
        spread = float(gain.std(ddof=1)) if len(gain) > 1 else 0.0
    error = spread / np.sqrt(len(gain))
    margin = float(gain.mean())
    chosen = best if margin > factor * error or not np.isfinite(objectives[0]).all() else 0  # no current figure
    return chosen, {"best_on_mean": best, "gain_over_current": margin, "spread_over_seeds": spread,
                    "standard_error": error, "factor": factor, "kept_current": chosen == 0 and best != 0}


def search(config: Any, load: Callable[[Any], LoadedDetector], grids: Sequence[Grid], split,
           progress: bool = True) -> tuple[Any, list[dict], dict]:
    """(the config with the candidate :func:`robust_choice` takes on ``split``, one row per candidate, the
    rule's record). ``load`` turns a config into its detector."""
    from tqdm.auto import tqdm

    current = current_values(config, setting_names(grids))
    rows, configs = [], []
    # smoothing 0: the ETA from the mean time per setting so far, not from the last ones (settings that only
    # re-weigh maps already computed, e.g. DRDC's alpha, take a fraction of a second, the others minutes)
    bar = tqdm(candidates(grids, current), desc="tune (settings on validation)", unit="setting", smoothing=0,
               disable=not progress, dynamic_ncols=True)
    for candidate in bar:
        bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in candidate.items()))
        configs.append(with_candidate(config, candidate))
        rows.append({**candidate, **validation_score(load(configs[-1]), split)})
    if all(r["objective"] is None for r in rows):
        return config, rows, {"rule": "no candidate has a validation objective: the current settings stay"}
    per_seed = [[s["objective"] for s in r["seeds"].values()] if "seeds" in r else [r["objective"]] for r in rows]
    chosen, record = robust_choice(np.array([[-np.inf if v is None else v for v in row] for row in per_seed]))
    record["seeds"] = list(rows[0].get("seeds", {})) or None
    return configs[chosen], rows, record


def validation_split(data: Any, synthetic=None, seeds: Sequence[int] | None = None, log=None):
    """The validation split ``ddad tune`` chooses on: the user's real defects where given, else synthetic ones
    drawn with each of ``seeds`` (default :data:`SEEDS` and as many more as it takes for :data:`MIN_DEFECTS`
    defects; seeds given are used as given). None where the run holds out no images."""
    return load_validation_split(data, synthetic, progress=False, log=log, seeds=SEEDS if seeds is None else seeds,
                                 min_defects=MIN_DEFECTS if seeds is None else 0)


def tune(run: RunDir, config: Any, load: Callable[[Any], LoadedDetector], grids: Sequence[Grid],
         progress: bool = True, seeds: Sequence[int] | None = None, synthetic=None) -> tuple[Any, list[dict], dict]:
    """:func:`search` on the run's :func:`validation_split` (``synthetic``: the kinds of its synthetic defects,
    default every kind; an error naming the remedy where the run has no validation split)."""
    split = validation_split(config.data, synthetic, seeds, run.log)
    if split is None:
        raise ValueError(f"run {run.root} holds out no validation images (data.val_ratio is 0 and no "
                         "val_abnormal_dir): retrain with --val-ratio, or add --val-abnormal-dir")
    best, rows, record = search(config, load, grids, split, progress)
    origins = [synthetic_origin(s) for s in split.samples]  # (kind, seed) of a synthetic defect, else None
    real = [str(s.image) for s, o in zip(split.samples, origins) if s.label == 1 and o is None]
    record["defects"] = ({"real": len(real), "images": real} if real
                         else {"synthetic": int(split.labels.sum()), "seeds": sorted({o[1] for o in origins if o})})
    return best, rows, record
