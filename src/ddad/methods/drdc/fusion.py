"""DRDC's heatmaps and their spatio-temporal fusion (paper Sec. 4.2 and 4.4, Eq. 9 and 14-17).

    H_t,s  = up_s( mean_c | down_s(x) - down_s(x^_t) | )      one step t, one scale s (Eq. 9, Eq. 14)
    H_diff = mean over steps t, scales s and inpainting specifications of H_t,s         (Eq. 15)
    H~     = K_k * H_diff  (k x k mean filter)                                          (Eq. 16)
    H      = alpha * H~ + (1 - alpha) * H_base                                          (Eq. 17)

x^_t is the inpainted image predicted at step t (Eq. 8); down_s is s x s average pooling and up_s bilinear
upsampling back. The paper's text lost the exact per-pixel distance of Eq. 9: this is the mean absolute
difference over channels (DDAD's pixel distance). Both maps are put on one scale before Eq. 17 by dividing
each by its maximum over defect-free calibration images (:class:`ddad.scoring.ScoreScale`, as DDAD's Eq. 9).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ...scoring import local_average


def rescaled(maps: torch.Tensor, scale: int) -> torch.Tensor:
    """``maps`` (B, C, H, W) average-pooled by ``scale`` and bilinearly upsampled back (1: unchanged)."""
    if scale == 1:
        return maps
    size = maps.shape[-2:]
    return F.interpolate(F.avg_pool2d(maps, scale), size=size, mode="bilinear", align_corners=False)


def difference_map(x: torch.Tensor, prediction: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """(B, 1, H, W): Eq. 9 at full resolution, Eq. 14 at a coarser ``scale``."""
    if scale == 1:
        return (x - prediction).abs().mean(dim=1, keepdim=True)
    size = x.shape[-2:]
    diff = (F.avg_pool2d(x, scale) - F.avg_pool2d(prediction, scale)).abs().mean(dim=1, keepdim=True)
    return F.interpolate(diff, size=size, mode="bilinear", align_corners=False)


def spatio_temporal_heatmap(x: torch.Tensor, predictions: Sequence[torch.Tensor], scales: Sequence[int]) -> torch.Tensor:
    """Eq. 15: the per-pixel mean of the difference maps of every prediction (steps and inpainting
    specifications) at every scale."""
    maps = [difference_map(x, p, s) for p in predictions for s in scales]
    return torch.stack(maps).mean(dim=0)


def mean_filter(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Eq. 16: a size x size mean filter (the border averages only the pixels inside the image)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the mean filter size must be odd and >= 1, got {size}")
    return local_average(maps, size)


def multiscale(maps: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """The mean of ``maps`` over ``scales`` (Table 5's "multi-scale in base heatmap")."""
    return torch.stack([rescaled(maps, s) for s in scales]).mean(dim=0)


def fuse(base: torch.Tensor, refined: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 17: alpha on the diffusion heatmap, 1 - alpha on the base heatmap (alpha = 1 ignores the base)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * refined + (1.0 - alpha) * base
