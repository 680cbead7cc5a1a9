"""An exported model that is one graph from image to map (DRDC's transformer base: backbone, feature
reconstruction, Eq. 2's heatmap, pooling): image -> anomaly map, score, and the global embedding that
recognises the category (for the decisions of a model of several categories)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .model import ExportedModel


class GraphModel(ExportedModel):
    KIND = "graph"
    GRAPHS = ("model",)
    QUANTISED = ("model",)

    def score(self, images: np.ndarray, categories: Sequence[str | None] | None = None) -> dict:
        given = list(categories) if categories is not None else [None] * len(images)
        maps, scores, resolved = [], [], []
        for start, x in self.batches(images):
            m, s, embeddings = self.graphs["model"]({"image": x})
            maps.append(m)
            scores.append(s)
            resolved += self.resolve(given[start:start + len(x)], len(x), embeddings)
        return {"score": np.concatenate(scores), "anomaly_map": np.concatenate(maps), "categories": resolved}
