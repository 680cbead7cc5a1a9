"""An exported memory-bank model (PatchCore; DRDC with its memory-bank base): the feature graph (image ->
features (B, D, h, w) and the global embedding that recognises the category), the exact nearest-neighbour
distance of every feature to its category's memory bank (numpy, the banks stored as .npy files in the folder),
then the map graph (distance grid -> map, score: the method's upsampling, smoothing, crop and maximum).

    s(x)_ij = min_{m in M_c} || phi(x)_ij - m ||_2        M_c: the bank(s) of :func:`banks_for`
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .model import ExportedModel, checked_file

UNIFIED = "all"  # the name of the one bank of a run that does not keep one per category


def banks_for(banks: Mapping, category: str | None) -> list:
    """The banks an image of ``category`` is compared with: its category's own; the one bank of a unified
    run; every bank when its category is unknown (the nearest patch of any category)."""
    if category in banks:
        return [banks[category]]
    if UNIFIED in banks:
        return [banks[UNIFIED]]
    return list(banks.values())


def nearest_distances(queries: np.ndarray, bank: np.ndarray, chunk: int = 512, block: int = 4096) -> np.ndarray:
    """(Q,) Euclidean distance of each query (Q, D) to its nearest bank row (M, D), exactly: the nearest row
    by the expansion |b|^2 - 2 q.b (blocks of rows, bounded memory; ties keep the earlier row), then its
    distance taken directly (no cancellation error)."""
    bank = np.asarray(bank, dtype=np.float32)
    bank_sq = (bank * bank).sum(axis=1)
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), chunk):
        q = np.asarray(queries[start:start + chunk], dtype=np.float32)
        best = np.full(len(q), np.inf, dtype=np.float32)
        nearest = np.zeros(len(q), dtype=np.int64)
        for first in range(0, len(bank), block):
            values = bank_sq[first:first + block] - 2 * (q @ bank[first:first + block].T)
            index = values.argmin(axis=1)
            value = values[np.arange(len(q)), index]
            closer = value < best
            best = np.where(closer, value, best)
            nearest = np.where(closer, index + first, nearest)
        out[start:start + chunk] = np.linalg.norm(q - bank[nearest], axis=1)
    return out


class BankModel(ExportedModel):
    KIND = "bank"
    GRAPHS = ("features", "scorer")
    QUANTISED = ("features",)  # the map graph holds no weights to speak of: nothing to gain

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.banks = {name: np.load(checked_file(self.folder, self.manifest, entry)[0], allow_pickle=False)
                      for name, entry in self.manifest["banks"].items()}

    def distances(self, features: np.ndarray, categories: Sequence[str | None]) -> np.ndarray:
        """(B, 1, h, w) from patch features (B, D, h, w); the images of one category in one search per bank."""
        b, d, h, w = features.shape
        out = np.empty((b, 1, h, w), dtype=np.float32)
        for category in dict.fromkeys(categories):
            rows = [i for i, c in enumerate(categories) if c == category]
            queries = features[rows].transpose(0, 2, 3, 1).reshape(-1, d)
            nearest = np.min([nearest_distances(queries, bank) for bank in banks_for(self.banks, category)], axis=0)
            out[rows] = nearest.reshape(len(rows), 1, h, w)
        return out

    def score_batch(self, x: np.ndarray, categories: list[str | None]) -> dict:
        """Each image against the bank(s) of its category (given, or recognised from its embedding)."""
        features, embeddings = self.graphs["features"]({"image": x})
        names = self.resolve(categories, len(x), embeddings)
        maps, scores = self.graphs["scorer"]({"grid": self.distances(features, names)})
        return {"score": scores, "anomaly_map": maps, "categories": names}
