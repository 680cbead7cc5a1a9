"""A trained run ready to decide, for scripts and for ``ddad predict``: images in, decided results out.

    model = Inferencer.from_run(run, loaded)          # or ddad.load_model("runs/washer")
    result = model(images)                            # AnomalyResult, as anomalib's inferencers return it:
    result.score                                      #   raw score (the method's scale)
    result.pred_score, result.pred_label              #   normalised (0.5 at the threshold), score >= threshold
    result.anomaly_map, result.pred_mask              #   heatmap, and >= the pixel threshold where one was chosen

The decisions are the run's stored ones (chosen by ``ddad test`` or ``ddad tune`` on the validation split
under this detector's calibration key), else a threshold given by hand (which decides but cannot normalise).
A model of several categories decides each image by its category: the one given, else the one recognised from
the image (:mod:`.recognition`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..results import AnomalyResult
from ..runs import RunDir
from .calibration import stored_threshold
from .detection import LoadedDetector
from .recognition import build_recogniser
from .thresholds import Decision, Decisions, Threshold


@dataclass
class Inferencer:
    """A loaded detector with the run's decisions (:meth:`from_run`)."""

    run: RunDir
    loaded: LoadedDetector
    decisions: Decisions | None  # None: no threshold stored or given; only the raw score and map
    stored: dict | None = None  # the stored threshold record (with its colour scale), if one was read
    note: str = ""  # why pred_score (or the decision) is left empty, '' when both are filled
    progress: bool = False
    _recognise: object = field(default=None, repr=False)

    @classmethod
    def from_run(cls, run: RunDir, loaded: LoadedDetector, threshold: float | None = None,
                 progress: bool = False) -> "Inferencer":
        """The run's stored decisions (an error naming the command that stores them when there are none and
        no ``threshold`` is given), or ``threshold`` for every image."""
        stored = None
        if threshold is None:
            stored = stored_threshold(run, loaded.key, f"Run `ddad test {run.root}` with the same detection "
                                                       "settings to store one")
        if stored is not None:
            decisions = Decisions.from_stored(stored)
        elif threshold is not None:
            decisions = Decisions(Decision(Threshold(threshold, "given", {}, threshold, threshold)), normalises=False)
        else:
            decisions = None
        note = ("no threshold: run `ddad test` (or `ddad tune`) to store one, or pass --threshold" if decisions is None
                else "" if decisions.normalises else
                "pred_score needs the validation scores' range: " + ("the threshold was given (--threshold)"
                                                                     if threshold is not None else
                                                                     "the stored threshold was not chosen on a "
                                                                     "validation split"))
        return cls(run, loaded, decisions, stored, note, progress)

    @property
    def categories(self) -> list:
        """The categories the model knows (one decision each where it has several)."""
        return self.loaded.categories

    def recognise(self, images: torch.Tensor) -> list[str]:
        """Each image's category, the nearest of the run's by the backbone's global feature."""
        if self.loaded.embed is None:
            raise ValueError("this run's method cannot recognise categories: give each image's category")
        if self._recognise is None:
            self._recognise = build_recogniser(self.run, self.loaded.data, self.loaded.embed,
                                               self.loaded.embed_identity, self.loaded.batch_size, self.progress)
        return list(self._recognise(images))

    def resolve(self, images: torch.Tensor, categories: Sequence[str | None] | None) -> list[str | None]:
        """Each image's category: the one given, else the run's only one, else the recognised one (None where
        the model knows several categories and cannot recognise them: the shared decision)."""
        known = list(categories) if categories is not None else [None] * len(images)
        if len(known) != len(images):
            raise ValueError(f"{len(known)} categories for {len(images)} images")
        for c in known:
            if c is not None and c not in self.categories:
                raise ValueError(f"category {c!r} is not one of this run's: {', '.join(self.categories) or 'none'}")
        if len(self.categories) == 1:
            return [self.categories[0] if c is None else c for c in known]
        unknown = [i for i, c in enumerate(known) if c is None]
        if unknown and len(self.categories) > 1 and self.loaded.embed is not None:
            for i, name in zip(unknown, self.recognise(images[unknown])):
                known[i] = name
        return known

    def __call__(self, images: torch.Tensor, categories: Sequence[str | None] | None = None) -> AnomalyResult:
        """Score and decide a batch of images (N, C, H, W) in [-1, 1] at the run's size and channels (as
        :func:`ddad.data.io.read_image` reads them)."""
        size, channels = self.loaded.data.image_size, self.loaded.data.channels
        if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
            raise ValueError(f"images must be (N, {channels}, {size}, {size}) for this run, got {tuple(images.shape)}")
        return self.decide(images, self.resolve(images, categories))

    def decide(self, images: torch.Tensor, categories: list[str | None]) -> AnomalyResult:
        """Scored as ``categories`` name them (already resolved) and decided by their decisions."""
        result = self.loaded.detect(images, categories) if self.loaded.by_category else self.loaded.detect(images)
        return result if self.decisions is None else self.decisions.apply(result, categories)
