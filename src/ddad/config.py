"""Typed settings of a run, and their YAML form.

A run is described by one :class:`RunConfig` made of small frozen dataclasses, each owned by the
module that uses it (data, UNet, schedule, training, detection). Functions receive only the piece
they need; nothing reads a global configuration.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .adaptation import AdaptConfig
from .data.formats import DataConfig
from .detection import DetectConfig
from .diffusion.schedule import ScheduleConfig
from .diffusion.unet import UNetConfig
from .training import TrainConfig


class ConfigError(ValueError):
    """A configuration file or flag names an unknown setting or an invalid value."""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin is typing.Union or str(origin) == "types.UnionType":
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, where) if len(non_none) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, where) for v in value)
    if dataclasses.is_dataclass(tp):
        return dataclass_from_dict(tp, value, f"{where}.")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def dataclass_from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming them."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(f'{where}{k}' for k in unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {exc}") from None


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples/paths to YAML-friendly plain values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig.ddad)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        return dataclass_from_dict(cls, _upgrade(data))

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: Path | str) -> "RunConfig":
        return cls.from_mapping(read_yaml_mapping(path), path)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: Path | str) -> "RunConfig":
        """:meth:`from_dict` with errors prefixed by ``source`` (the file the mapping came from)."""
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def replace(self, **sections: Any) -> "RunConfig":
        return dataclasses.replace(self, **sections)

    def with_recipe(self, name: str, **train_overrides: Any) -> "RunConfig":
        """This config trained with recipe ``name`` (:data:`ddad.training.RECIPES`). The paper's recipe
        also adapts the extractor as the authors' code does, with BatchNorm statistics following the data."""
        return self.replace(train=TrainConfig.recipe(name, **train_overrides),
                            adapt=dataclasses.replace(self.adapt, train_batchnorm=name == "paper"))


def _upgrade(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Configs written by earlier versions: ``detect.scoring.normalize_over_batch`` (a bool) became
    ``normalization``; such a run keeps the normalisation it was evaluated with."""
    scoring = (data.get("detect") or {}).get("scoring") if isinstance(data.get("detect"), Mapping) else None
    if not isinstance(scoring, Mapping) or "normalize_over_batch" not in scoring:
        return data
    scoring = dict(scoring)
    over_batch = scoring.pop("normalize_over_batch")
    scoring.setdefault("normalization", "batch" if over_batch else "image")
    return {**data, "detect": {**data["detect"], "scoring": scoring}}


def read_yaml_mapping(path: Path | str) -> dict:
    """The mapping stored in YAML file ``path``; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """Recursive dict merge: ``override`` wins."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_assignment(text: str) -> dict:
    """``section.key=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out
