"""One call for any servable model: images (N, C, H, W) in [-1, 1] at the model's size and their categories
(None: recognised, as ``ddad predict`` does) -> one decided result per image. A run scores in PyTorch with its
stored decisions (:func:`ddad.load_model`); a folder of ``ddad export`` through :mod:`ddad_infer`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class Decided:
    """One image's answer (anomalib's names; ``threshold`` and the decision None without stored decisions)."""

    score: float
    pred_score: float | None
    pred_label: bool | None
    threshold: float | None
    threshold_source: str | None
    category: str | None
    anomaly_map: np.ndarray  # (H, W) at the model's size
    pred_mask: np.ndarray | None


class Predictor:
    """A run directory or an exported folder, loaded once (:func:`open_predictor`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.exported = (self.path / "export.json").is_file()
        if self.exported:
            import ddad_infer

            self.model = ddad_infer.load(self.path)
            manifest = self.model.manifest
            self.channels, self.image_size = self.model.channels, self.model.image_size
            self.batch_size, self.key = self.model.batch_size, self.model.key
            self.decisions = self.model.decisions
            self.info = {"source": "export", "method": manifest["method"], "run": manifest.get("run"),
                         "settings": manifest.get("settings"), "categories": self.model.categories}
        else:
            from ddad import load_model

            self.model = load_model(self.path)
            loaded = self.model.loaded
            self.channels, self.image_size = loaded.data.channels, loaded.data.image_size
            self.batch_size, self.key = loaded.batch_size, loaded.key.digest
            self.decisions = self.model.decisions
            self.info = {"source": "run", "method": _method(self.path),
                         "run": str(self.path.resolve()), "settings": loaded.settings,
                         "categories": list(loaded.categories), "data": loaded.data.to_dict()}
        self.info.update({"calibration_key": self.key, "image_size": self.image_size, "channels": self.channels,
                          "batch_size": self.batch_size,
                          "decisions": None if self.decisions is None else self.decisions.to_dict()})

    def check_category(self, category: str | None) -> None:
        known = self.info["categories"]
        if category is not None and len(known) > 1 and category not in known:
            raise ValueError(f"category {category!r} is not one of this model's: {', '.join(known)}")

    def __call__(self, images: np.ndarray, categories: Sequence[str | None]) -> list[Decided]:
        if self.exported:
            out = self.model.predict_arrays(images, list(categories))
            cats, scores, maps = out["categories"], out["score"], out["anomaly_map"]
            pred_score, labels, masks = out["pred_score"], out["pred_label"], out["pred_mask"]
        else:
            import torch

            batch = torch.from_numpy(np.ascontiguousarray(images))
            cats = self.model.resolve(batch, list(categories))
            res = self.model.decide(batch, cats)
            scores, maps = res.score.numpy(), res.anomaly_map.numpy()
            pred_score = None if res.pred_score is None else res.pred_score.numpy()
            labels = None if res.pred_label is None else res.pred_label.numpy()
            masks = None if res.pred_mask is None else res.pred_mask.numpy()
        out = []
        for i, cat in enumerate(cats):
            decision = None if self.decisions is None else self.decisions.of(cat)
            out.append(Decided(
                score=float(scores[i]), pred_score=None if pred_score is None else float(pred_score[i]),
                pred_label=None if labels is None else bool(labels[i]),
                threshold=None if decision is None else float(decision.image.value),
                threshold_source=None if decision is None else decision.image.source, category=cat,
                anomaly_map=np.asarray(maps[i, 0], dtype=np.float32),
                pred_mask=None if masks is None else np.asarray(masks[i, 0], dtype=bool)))
        return out


def _method(run: Path) -> str | None:
    import yaml

    try:
        return (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("method", "ddad")
    except (OSError, yaml.YAMLError):
        return None
