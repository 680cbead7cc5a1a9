"""An exported model that is one graph from image to map (DRDC's transformer base: backbone, feature
reconstruction, Eq. 2's heatmap, pooling): image -> anomaly map, score, and the global embedding that
recognises the category (for the decisions of a model of several categories)."""

from __future__ import annotations

import numpy as np

from .model import ExportedModel


class GraphModel(ExportedModel):
    KIND = "graph"
    GRAPHS = ("model",)
    QUANTISED = ("model",)

    def score_batch(self, x: np.ndarray, categories: list[str | None]) -> dict:
        maps, scores, embeddings = self.graphs["model"]({"image": x})
        return {"score": scores, "anomaly_map": maps, "categories": self.resolve(categories, len(x), embeddings)}
