"""PatchCore (Roth et al., CVPR 2022) as a method of the engine: a memory bank of locally aware patch
features of defect-free images, no training; one bank per category or one for all."""

from .method import PatchCore

__all__ = ["PatchCore"]
