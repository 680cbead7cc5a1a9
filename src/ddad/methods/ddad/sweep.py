"""``ddad sweep``: DDAD's metrics over a grid of w, v, scoring mode and extractor, at the cost of one
diffusion pass per w (cached reconstructions) and one backbone pass per (w, extractor); v and the mode
only rescore stored distances.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Sequence

from ...data.splits import load_test_split
from ...engine.testing import split_metrics
from ...runs import RunDir
from ...scoring import CALIBRATED_NORMALIZATIONS, anomaly_map, image_scores
from .extractors import adapted_checkpoint
from .loading import build_detector, calibrate, reconstruct_split, scale_key, score_split, with_detection
from .settings import DDADConfig


def sweep(
    run: RunDir,
    config: DDADConfig,
    ws: Sequence[float],
    vs: Sequence[float],
    modes: Sequence[str] = ("pixel", "feature", "combined"),
    extractors: Sequence[str] = ("pretrained", "adapted"),
    progress: bool = True,
) -> list[dict]:
    """One row of metrics per (w, mode, v, extractor) for the run with detection settings ``config``.
    Combined scoring with calibrated normalisation is calibrated once per (w, extractor) and stored where
    ``ddad test`` finds it (the scale does not depend on v)."""
    base = config.detect
    split = load_test_split(config.data, progress, run.log)
    need_features = any(m != "pixel" for m in modes)
    names = [e for e in extractors if e != "adapted" or adapted_checkpoint(run, config.weights.adapted_epoch)]
    rows = []
    for w in ws:
        pixel_config = with_detection(config, w=float(w), mode="pixel")
        detector, _ = build_detector(run, pixel_config)
        recon = reconstruct_split(detector, run, pixel_config, split, progress=progress)
        pix = score_split(detector, split, recon).extras["pixel_distance"]
        for ext_index, ext_name in enumerate(names if need_features else ["-"]):
            d_f = scale = None
            if ext_name != "-":
                feature_config = with_detection(config, w=float(w), mode="feature", adapted=ext_name == "adapted")
                fdet, networks = build_detector(run, feature_config)
                d_f = score_split(fdet, split, recon).extras["feature_distance"]
                if "combined" in modes and base.scoring.normalization in CALIBRATED_NORMALIZATIONS:
                    scale = calibrate(fdet, run, feature_config, scale_key(feature_config, networks), progress)
            for mode in modes:
                if mode != "pixel" and d_f is None:
                    continue
                if mode == "pixel" and ext_index > 0:
                    continue  # pixel-only does not depend on the extractor
                for v in (vs if mode == "combined" else [None]):
                    scoring = replace(base.scoring, mode=mode, v=float(v) if v is not None else base.scoring.v)
                    maps = anomaly_map(pix, d_f, scoring, scale)
                    scores = image_scores(maps, base.crop).numpy()
                    metrics = split_metrics(split, scores, maps, base.crop)
                    rows.append({"w": float(w), "mode": mode, "v": v, "extractor": ext_name if mode != "pixel" else "-",
                                 **asdict(metrics)})
    return rows
