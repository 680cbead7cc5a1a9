"""DRDC (Enhancing Multi-Class Anomaly Detection via Diffusion Refinement with Dual Conditioning), part 1:
one model for many categories. settings -> features (frozen backbone, cached) -> model (the neighbour-
masked transformer, Eq. 1-2) -> detector (base heatmap, score) -> method (what the engine calls).
"""

from .method import DRDC

__all__ = ["DRDC"]
