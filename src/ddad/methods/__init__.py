"""The methods ddad knows, by the name a run's config.yaml gives under ``method:``.

A method provides its settings class (``settings``, a :class:`ddad.config.RunSettings`), a check of its
training set, ``fit`` (its trainable model and objective through ``ddad.engine.trainer.fit``), ``load``
(its detector as the engine's :class:`ddad.engine.detection.LoadedDetector`), ``export`` (its graphs) and
``with_detection`` (its detection settings changed by name). ``ddad train``, ``test``, ``predict``,
``report`` and ``export`` then work unchanged for any of them.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..config import ConfigError, RunSettings
from ..runs import RunDir
from .ddad import DDAD
from .drdc import DRDC
from .patchcore import PatchCore

METHODS = {"ddad": DDAD(), "drdc": DRDC(), "patchcore": PatchCore()}
DEFAULT_METHOD = "ddad"  # config.yaml files written before ddad had several methods


def get_method(name: str) -> Any:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def method_of(data: Mapping[str, Any]) -> Any:
    """The method a config mapping names (``method:``; DDAD where absent)."""
    return get_method(str(data.get("method") or DEFAULT_METHOD))


def load_run_config(run: RunDir) -> RunSettings:
    """The run's settings, typed by its method, from config.yaml as any version wrote it."""
    data = run.read_config()
    settings = method_of(data).settings
    config = settings.from_mapping(settings.upgrade_stored(data), run.config_path)
    return config.replace(data=config.data.located(run.root))
