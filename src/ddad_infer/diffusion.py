"""DDAD's exported model: Alg. 1's conditioned denoising in numpy around the exported noise predictor
(unet: x_t, t -> eps), then the scorer graph (Eq. 8-9, Gaussian, crop, maximum: y, x0 -> map, score)."""

from __future__ import annotations

from typing import Sequence

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

    def score(self, images: np.ndarray, categories: Sequence[str | None] | None = None) -> dict:
        """Batch by batch, each image with its own seeded noise (its result does not depend on the others);
        one model for its category, so ``categories`` change nothing."""
        parts = []
        for _, y in self.batches(images):
            seeds = [image_seed(img, self.seed) for img in y]
            x0 = reconstruct(self._denoise, y, self.table, seeds, **self.sampler)
            maps, scores = self.graphs["scorer"]({"y": y, "x0": x0})
            parts.append((scores, maps, x0))
        return {"score": np.concatenate([p[0] for p in parts]), "anomaly_map": np.concatenate([p[1] for p in parts]),
                "reconstruction": np.concatenate([p[2] for p in parts])}
