"""The calibration key, and what is stored under it: score scales and decision thresholds.

A score is comparable with a threshold only when both come from the same detection algorithm, the same
weights and the same networks. The :class:`CalibrationKey` holds exactly that: a method's algorithm and
weights settings (whole dataclasses as plain values, never a list of chosen fields), the identity of the
network files they resolved to (checkpoint, extractor, exported graphs) and the data settings the
calibration images come from. Runtime settings (device, batch size, backend speed options) are not in it.

    RUN_DIR/calibration/scale-<key>.json (+ .safetensors)   Eq. 9's maxima (and per-pixel means)
    RUN_DIR/threshold.json                                   the decision threshold, with its key
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_write, atomic_write_text
from ..config import to_plain
from ..runs import RunDir
from ..scoring import ScoreScale


def file_id(path: Path) -> list:
    """A file's name, size and modification time: it changes when the file is rewritten."""
    stat = Path(path).stat()
    return [Path(path).name, stat.st_size, stat.st_mtime_ns]


@dataclass(frozen=True)
class CalibrationKey:
    settings: dict  # {"algorithm": ..., "weights": ...} as plain values
    networks: list  # identities of the network files
    data: dict

    @classmethod
    def of(cls, algorithm: Any, weights: Any, networks: list, data: Any) -> "CalibrationKey":
        return cls({"algorithm": to_plain(algorithm), "weights": to_plain(weights)}, to_plain(networks),
                   to_plain(data))

    def as_dict(self) -> dict:
        return {"settings": self.settings, "networks": self.networks, "data": self.data}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def key_differences(stored: Mapping, current: Mapping) -> list[str]:
    """``name: stored -> current`` for every setting where two keys (as dicts) differ."""
    a, b = _flatten(stored), _flatten(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def stored_scale(run: RunDir, key: CalibrationKey, compute: Callable[[], ScoreScale]) -> ScoreScale:
    """The score scale stored under ``key`` in the run, else ``compute()``'s, stored there (the per-pixel
    maps before the JSON, so a half-written calibration is never read)."""
    path = run.calibration_dir / f"scale-{key.digest}.json"
    maps_path = path.with_suffix(".safetensors")
    if path.is_file():
        stored = json.loads(path.read_text())["scale"]
        if not stored.pop("positional", False):
            return ScoreScale(**stored)
        if maps_path.is_file():
            return ScoreScale(**stored, **load_file(str(maps_path)))
    scale = compute()
    if scale.positional:
        atomic_write(maps_path, lambda tmp: save_file({k: v.contiguous() for k, v in scale.maps().items()}, tmp))
    atomic_write_text(path, json.dumps({"scale": scale.to_dict(), "key": key.as_dict()}, indent=2, default=str))
    return scale


class ThresholdMismatch(ValueError):
    """The stored threshold was chosen under another calibration key."""


KEPT_THRESHOLDS = 16  # records of other settings kept in threshold.json beside the latest


def store_threshold(run: RunDir, record: Mapping[str, Any], key: CalibrationKey,
                    colour_scale: tuple[float, float] | None = None) -> None:
    """The decision thresholds ``record`` (``threshold`` and ``source``, and as chosen on validation: the
    target, the validation score range that normalises scores, the pixel threshold, each category's own;
    see :class:`ddad.engine.thresholds.Decisions`) and the heatmaps' colour scale of the same test, under
    ``key``. The latest record is threshold.json's top level; those of other settings stay under ``others``
    (an experiment with other settings does not take the run's own threshold away)."""
    others: dict[str, Any] = {}
    path = run.threshold_path
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}
        others = dict(previous.pop("others", None) or {})
        if previous.get("calibration_key"):
            others[previous["calibration_key"]] = previous
    others.pop(key.digest, None)
    others = dict(list(others.items())[-KEPT_THRESHOLDS:])
    atomic_write_text(path, json.dumps(
        {**record, "colour_scale": colour_scale, "calibration_key": key.digest, "key": key.as_dict(),
         "others": others}, indent=2, default=str))


def stored_threshold(run: RunDir, key: CalibrationKey, remedy: str) -> dict | None:
    """The run's stored threshold record (``threshold``, ``source``, ``colour_scale``) if it was chosen
    under ``key``; None when there is none. One chosen under another key is an error that lists what
    differs and says how to make a valid one (``remedy``)."""
    path = run.threshold_path
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    others = stored.pop("others", None) or {}
    if stored.get("calibration_key") == key.digest:
        return stored
    if key.digest in others:
        return others[key.digest]
    if "key" in stored:
        differences = key_differences(stored["key"], json.loads(json.dumps(key.as_dict(), default=str)))
        why = "it was chosen under other settings (" + "; ".join(differences[:8]) + \
              (f"; and {len(differences) - 8} more" if len(differences) > 8 else "") + ")"
    else:
        why = "it was written by an earlier ddad version that did not record the settings it was chosen under"
    raise ThresholdMismatch(f"the stored threshold {path} does not fit these detection settings: {why}. "
                            f"{remedy}, or pass --threshold")
