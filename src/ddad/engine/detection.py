"""What the engine needs of a method's detector, whatever the method.

A method's loader returns a :class:`LoadedDetector`: a callable from a batch of images (N, C, H, W in
[-1, 1]) to an :class:`ddad.results.AnomalyResult`, with the run's data settings, the calibration key its
scores belong to, and its settings and facts for metrics.json. ``score_split`` scores a whole test split;
a method may replace it (DDAD caches its reconstructions), the default calls the detector batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..data.formats import DataConfig
from ..data.splits import TestSplit
from ..results import AnomalyResult
from . import distributed
from .calibration import CalibrationKey
from .recognition import Embed

BatchDetector = Callable[[torch.Tensor], AnomalyResult]


def score_in_batches(detect: BatchDetector, images: torch.Tensor, batch_size: int,
                     progress: Callable[[int], None] | None = None,
                     categories: Sequence[str | None] | None = None) -> AnomalyResult:
    """``detect`` batch by batch; with ``categories``, each batch's too (``detect(images, categories)``)."""
    parts = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        parts.append(detect(batch) if categories is None else detect(batch, categories[start:start + batch_size]))
        if progress is not None:
            progress(len(parts[-1]))
    return AnomalyResult.concat(parts)


@dataclass
class LoadedDetector:
    detect: BatchDetector
    data: DataConfig  # the run's data settings (image size, channels, dataset)
    key: CalibrationKey
    batch_size: int
    settings: dict  # the detection settings, as plain values (metrics.json)
    crop: float = 1.0  # centre-crop fraction of maps and masks for the pixel metrics and image scores
    info: dict = field(default_factory=dict)  # method facts for metrics.json (e.g. which extractor)
    split_scorer: Callable[[TestSplit, bool, bool], AnomalyResult] | None = None  # (split, cache, progress)
    by_category: bool = False  # ``detect(images, categories)``: each image scored as its category (e.g. its bank)
    categories: list = field(default_factory=list)  # the categories the model knows (several: per-category decisions)
    embed: Embed | None = None  # images -> global features, to recognise a category (:mod:`.recognition`)
    embed_identity: list = field(default_factory=list)  # what ``embed`` depends on (its backbone and weights)

    def score_split(self, split: TestSplit, cache: bool = True, progress: bool = True) -> AnomalyResult:
        """Every image of ``split`` scored once. Under torchrun each rank scores its contiguous part (no
        padding, no repeats) and every rank gets the whole result, in the split's order."""
        ctx = distributed.context("cuda" if torch.cuda.is_available() else "cpu")
        if not ctx.distributed:
            return self._score(split, cache, progress)
        part = ctx.shard(len(split.samples))
        local = self._score(split.subset(part), cache, progress and ctx.is_main) if part.stop > part.start else None
        gathered: list = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, local)
        return AnomalyResult.concat([g for g in gathered if g is not None])

    def _score(self, split: TestSplit, cache: bool, progress: bool) -> AnomalyResult:
        if self.split_scorer is not None:
            return self.split_scorer(split, cache, progress)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(split.images), desc="detect", unit="img", disable=not progress, dynamic_ncols=True)
        categories = [s.category for s in split.samples] if self.by_category else None
        result = score_in_batches(self.detect, split.images, self.batch_size, bar.update, categories)
        bar.close()
        return result
