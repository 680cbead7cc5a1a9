"""Typed settings and their YAML form: the generic machinery, owned by no method.

A run is described by one frozen dataclass made of small frozen dataclasses, each owned by the module
that uses it (data, UNet, schedule, training, detection); a method's run settings derive from
:class:`RunSettings`. Functions receive only the piece they need; nothing reads a global configuration.
This module imports no other module of the package.
"""

from __future__ import annotations

import dataclasses
import typing

from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

S = TypeVar("S", bound="RunSettings")


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
    """Dataclasses/tuples/paths, also inside mappings, to YAML-friendly plain values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


class RunSettings:
    """Mixin for a method's run settings (a frozen dataclass of sections): dict and YAML round trips,
    errors that name the file, and :meth:`upgrade` for mappings written by earlier versions."""

    @classmethod
    def upgrade(cls, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """A mapping written by an earlier version, in today's layout (override per method)."""
        return data

    @classmethod
    def upgrade_stored(cls, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """A run directory's config.yaml in today's layout, where stored runs need more than :meth:`upgrade`."""
        return data

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        return dataclass_from_dict(cls, cls.upgrade(data))

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[S], path: Path | str) -> S:
        return cls.from_mapping(read_yaml_mapping(path), path)

    @classmethod
    def from_mapping(cls: type[S], data: Mapping[str, Any], source: Path | str) -> S:
        """:meth:`from_dict` with errors prefixed by ``source`` (the file the mapping came from)."""
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def replace(self: S, **sections: Any) -> S:
        return dataclasses.replace(self, **sections)


def _as_declared(f: dataclasses.Field, value: Any) -> Any:
    """An int given for a float setting as that float (w=5 is w=5.0): the same settings, the same calibration
    key, whether they came from Python or the command line."""
    declared = str(f.type)
    if isinstance(value, int) and not isinstance(value, bool) and "float" in declared and "int" not in declared:
        return float(value)
    return value


def override(settings: Any, changes: Mapping[str, Any], within: tuple[str, ...] | None = None,
             ignore_none: bool = True) -> Any:
    """``settings`` (a dataclass) with fields replaced wherever they are in its tree of dataclasses (only
    under its top-level fields ``within``, if given), found by name; None values are ignored unless
    ``ignore_none`` is false (then None is a value, e.g. ``feature_size=None``). A name that no field has, or
    that two fields share, is an error."""
    if ignore_none:
        changes = {k: v for k, v in changes.items() if v is not None}
    owners: dict[str, list[str]] = {}

    def visit(obj: Any, path: str, top: bool) -> None:
        for f in dataclasses.fields(obj):
            if top and within is not None and f.name not in within:
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                visit(value, f"{path}{f.name}.", False)
            elif not top or within is None:
                owners.setdefault(f.name, []).append(path + f.name)

    visit(settings, "", True)
    for name in changes:
        if name not in owners:
            raise ConfigError(f"no setting named {name!r} in {type(settings).__name__}")
        if len(owners[name]) > 1:
            raise ConfigError(f"{name!r} is ambiguous in {type(settings).__name__}: {', '.join(owners[name])}")

    def rebuild(obj: Any, top: bool) -> Any:
        updates = {}
        for f in dataclasses.fields(obj):
            if top and within is not None and f.name not in within:
                continue
            value = getattr(obj, f.name)
            if f.name in changes and not dataclasses.is_dataclass(value):
                updates[f.name] = _as_declared(f, changes[f.name])
            elif dataclasses.is_dataclass(value):
                updates[f.name] = rebuild(value, False)
        return dataclasses.replace(obj, **updates)

    return rebuild(settings, True)


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


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


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict:
    """Recursive dict merge: ``top`` wins."""
    out = dict(base)
    for k, v in top.items():
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
