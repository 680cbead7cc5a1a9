"""DDAD's exported model: Alg. 1's conditioned denoising in numpy around the exported noise predictor
(unet: x_t, t -> eps), then the scorer graph (Eq. 8-9, Gaussian, crop, maximum: y, x0 -> map, score)."""

from __future__ import annotations

import numpy as np

from .model import ExportedModel
from .noise import image_seed
from .sampler import reconstruct


class DDADModel(ExportedModel):
    KIND = "diffusion"
    GRAPHS = ("unet", "scorer")
    QUANTISED = ("unet", "scorer")  # the scorer holds the feature extractor

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampler, self.seed = self.manifest["sampler"], int(self.manifest["seed"])
        self.table = np.asarray(self.manifest["alphas_cumprod"], dtype=np.float32)

    def _denoise(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.graphs["unet"]({"x": x, "t": t})[0]

    def score_batch(self, y: np.ndarray, categories: list[str | None]) -> dict:
        """Each image with its own seeded noise (its result does not depend on the others); one model for its
        category, so ``categories`` change nothing."""
        seeds = [image_seed(img, self.seed) for img in y]
        x0 = reconstruct(self._denoise, y, self.table, seeds, **self.sampler)
        maps, scores = self.graphs["scorer"]({"y": y, "x0": x0})
        return {"score": scores, "anomaly_map": maps, "reconstruction": x0}
