"""DRDC's diffusion refinement at inference (paper Sec. 4.2-4.4): inpaint every image once per inpainting
specification (cell size) and disjoint set, combine the sets (Eq. 8) at every step, and turn the step-wise
predictions into the diffusion heatmap (Eq. 9, 14-16).

All of an image's specifications and sets go through the UNet as one batch. Each image's masks and noise
come from a seed made of its content (at the model's input size, before the resize to the refinement's: the
bytes an exported model sees too) and ``detect.seed``, so its heatmap does not depend on the other images in
the batch or on the batch size. The exported model (:mod:`ddad_infer.inpainting`) repeats the loop in numpy
with the same draws and :func:`diffusion_heatmap` as a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddad_infer.inpainting import job_seed  # one rule for the run and its export

from ...diffusion.inpainting import InpaintingNoise, combine_sets, inpaint, inpainting_masks
from ...diffusion.sampler import SamplerConfig, denoising_steps, skip_for_steps
from ...diffusion.unet import UNet
from .fusion import difference_map, mean_filter, spatio_temporal_heatmap
from .settings import DRDCDetect, RefineConfig


@dataclass
class Refinement:
    heatmap: torch.Tensor  # (B, 1, H, W) the smoothed diffusion heatmap (Eq. 16), at the refinement's size
    inpainted: torch.Tensor  # (B, C, H, W) the final inpainted image of the first specification (Eq. 8)


def refinement_steps(detect: DRDCDetect) -> list[tuple[int, int]]:
    """(t, t_next) pairs of the deterministic DDIM from the initial index in ``detect.steps`` steps."""
    skip = skip_for_steps(detect.start_step, detect.steps)
    return denoising_steps(SamplerConfig(start_step=detect.start_step, skip=skip, w=0.0, eta=0.0))


def diffusion_heatmap(x: torch.Tensor, predictions: torch.Tensor, detect: DRDCDetect) -> torch.Tensor:
    """The smoothed diffusion heatmap (B, 1, h, w) of images ``x`` (B, C, h, w) from their combined predictions
    (B, S, K, C, h, w): S inpainting specifications, K steps' predicted x0 with ``detect.fusion`` (Eq. 14-15),
    else K = 1, the final inpainted image (Eq. 9); the mean over specifications, then the mean filter (Eq. 16)."""
    b, specs, k, c, h, w = predictions.shape
    x_specs = x.float().repeat_interleave(specs, dim=0)
    per_step = predictions.reshape(b * specs, k, c, h, w)
    if detect.fusion:
        per_spec = spatio_temporal_heatmap(x_specs, per_step.unbind(dim=1), detect.scales)
    else:
        per_spec = difference_map(x_specs, per_step[:, -1])
    return mean_filter(per_spec.view(b, specs, 1, h, w).mean(dim=1), detect.mean_filter)  # Eq. 15-16


class Refiner:
    """The inpainting UNet with its schedule and settings: images in [-1, 1] at the refinement's size ->
    :class:`Refinement`. Runs under the caller's inference mode; the device is the UNet's."""

    def __init__(self, unet: UNet, table: torch.Tensor, refine: RefineConfig, detect: DRDCDetect) -> None:
        self.unet, self.refine, self.detect = unet, refine, detect
        self.table = table.to(torch.float32)  # moved to the UNet's device at each call (1000 numbers)
        self.steps = refinement_steps(detect)

    def masks(self, seed: int, height: int, width: int) -> torch.Tensor:
        """(specifications, sets, 1, H, W): an image's masks, one disjoint split per cell size."""
        g = torch.Generator().manual_seed(seed)
        return torch.stack([inpainting_masks(height, width, cell, self.refine.sets, g) for cell in self.refine.cells])

    def __call__(self, x: torch.Tensor, seeds: list[int]) -> Refinement:
        """``x`` (B, C, H, W) at the refinement's size; ``seeds`` one per image (from the image as given)."""
        b, c, h, w = x.shape
        specs, sets = len(self.refine.cells), self.refine.sets
        device = next(self.unet.parameters()).device
        masks = torch.stack([self.masks(s, h, w) for s in seeds]).to(device)  # (B, S, n, 1, H, W)
        jobs = specs * sets
        job_seeds = [job_seed(s, j) for s in seeds for j in range(jobs)]
        x_jobs = x.to(device).float().repeat_interleave(jobs, dim=0)
        hidden = masks.reshape(b * jobs, 1, h, w)
        noise = InpaintingNoise.draw(job_seeds, (c, h, w), self.steps, device)
        out = inpaint(lambda xt, t, cond: self.unet(xt, t, cond), x_jobs, hidden, self.table.to(device), self.steps, noise,
                      self.refine.model_conditioning, self.detect.test_time_conditioning)

        def combined(prediction: torch.Tensor) -> torch.Tensor:  # Eq. 8 -> (B, S, C, H, W)
            per_set = prediction.view(b * specs, sets, c, h, w).transpose(0, 1)
            return combine_sets(per_set, hidden.view(b * specs, sets, 1, h, w).transpose(0, 1)).view(b, specs, c, h, w)

        final = combined(out.sample)
        steps = [combined(p) for p in out.pred_original_samples] if self.detect.fusion else [final]
        heatmap = diffusion_heatmap(x.to(device), torch.stack(steps, dim=2), self.detect)
        return Refinement(heatmap, final[:, 0])


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) images bilinearly resized (antialiased) to size x size, unchanged at that size; uint8
    images (0..255, training sets kept small) stay uint8."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else out
