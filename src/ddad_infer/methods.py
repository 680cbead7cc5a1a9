"""The exported models this runtime scores, by the kind of model in their manifest
(:func:`ddad_infer.model.model_kind`)."""

from __future__ import annotations

from .banks import BankModel
from .diffusion import DDADModel
from .direct import GraphModel

MODELS = {model.KIND: model for model in (DDADModel, BankModel, GraphModel)}
