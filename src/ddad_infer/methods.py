"""The exported models this runtime scores, by the kind of model in their manifest
(:func:`ddad_infer.model.model_kind`), and :func:`load`, which picks the kind."""

from __future__ import annotations

from pathlib import Path

from .banks import BankModel
from .diffusion import DDADModel
from .direct import GraphModel
from .model import MANIFEST, ExportedModel, ExportError, model_kind, read_manifest

MODELS = {model.KIND: model for model in (DDADModel, BankModel, GraphModel)}


def load(folder: Path | str, backend: str | None = None, threads: int | None = None,
         precision: str = "fp32") -> ExportedModel:
    """The exported model in ``folder``, of whichever kind it holds (``backend``: onnxruntime or openvino,
    default from its format; ``precision`` int8: the graphs of ``ddad export --int8``, in OpenVINO)."""
    manifest = read_manifest(Path(folder))
    kind = model_kind(manifest)
    if kind not in MODELS:
        raise ExportError(f"{Path(folder) / MANIFEST} holds a {manifest.get('method')!r} model of kind {kind!r}; "
                          f"this runtime scores {', '.join(MODELS)}")
    return MODELS[kind](folder, backend, threads, precision)
