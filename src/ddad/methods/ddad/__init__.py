"""DDAD (Mousakhan, Brox, Tayyub: Anomaly Detection with Conditioned Denoising Diffusion Models).

settings (detection algorithm, weights, config.yaml) -> detector (Alg. 1, Eq. 8-9) -> loading (networks,
calibration, cached reconstructions) -> method (what the engine calls); beside them: extractors and
adaptation (Eq. 10), presets (Tables 9-11), sweep, graphs (ONNX export), official (the authors' checkpoints).
"""

from .method import DDAD

__all__ = ["DDAD"]
