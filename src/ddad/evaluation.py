"""``ddad test`` and ``ddad predict``: run the detector over images and write what a user reads.

test:    RUN_DIR/test/metrics.json, scores.csv, images/<type>_<name>.png; RUN_DIR/threshold.json
predict: OUT/scores.csv, OUT/images/<name>.png
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoint import atomic_write, atomic_write_text
from .config import RunConfig
from .data.dataset import ImageSet
from .data.formats import build_index
from .data.io import DatasetError, is_image_file, read_image
from .detection import DetectConfig, DetectionResult, Detector
from .metrics import area_up_to, f1_optimal_threshold, pixel_auroc, pro_curve, roc_auc
from .runs import RunDir
from .runtime import resolve_device
from .scoring import CALIBRATED_NORMALIZATIONS, ScoreScale, crop
from .training import check_trained_timestep
from .visualize import panel, save_png

PRO_LIMIT = 0.3


def load_detector(run: RunDir, detect: DetectConfig | None = None, calibrate: bool = True,
                  progress: bool = True) -> tuple[Detector, RunConfig]:
    """The run's trained UNet wrapped in a :class:`Detector` with ``detect`` (default: the run's).

    Feature-wise scoring uses the run's domain-adapted extractor when it has one and ``detect.adapted``
    is set (``detect.adapted_epoch`` picks the epoch), else the pretrained backbone. With ``calibrate``,
    a detector whose scoring needs Eq. 9's calibrated maxima gets them (:func:`run_score_scale`)."""
    from .adaptation import adapted_checkpoint, load_adapted_extractor

    config = run.load_config()
    detect = detect or config.detect
    check_trained_timestep(config.train, detect.sampler.start_step, detect.force_timestep)
    adapted_file = None
    if detect.backend == "onnxruntime":
        from .export import onnx_detector

        detector, config = onnx_detector(run, detect)
    else:
        device = resolve_device(detect.device)
        unet = run.load_unet(device, detect.checkpoint, detect.weights)
        extractor = None
        if detect.scoring.uses_features and detect.adapted:
            adapted_file = adapted_checkpoint(run, detect.adapted_epoch)
        if adapted_file is not None:
            extractor = load_adapted_extractor(adapted_file, detect.backbone, detect.scoring.feature_layers)
        detector = Detector(unet, detect, config.schedule, extractor=extractor, device=device)
    if calibrate and detect.scoring.needs_calibration:
        run_score_scale(detector, run, config, adapted_file, progress=progress)
    return detector, config


def _file_id(path: Path) -> list:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def calibration_images(config: RunConfig, count: int, seed: int) -> torch.Tensor:
    """Up to ``count`` defect-free training images in a seeded order: the images Eq. 9 is calibrated on."""
    index = build_index(config.data)
    if not index.train:
        raise DatasetError(f"calibrated scoring needs defect-free training images, and {index.name} has none; "
                           "set detect.scoring.normalization to 'image'")
    order = torch.randperm(len(index.train), generator=torch.Generator().manual_seed(seed)).tolist()
    dataset = ImageSet(tuple(index.train[i] for i in order), config.data.image_size, config.data.channels)
    picked = []
    for i in range(len(dataset)):
        if len(picked) == count:
            break
        try:
            picked.append(dataset[i]["image"])
        except DatasetError:
            if not config.data.skip_bad_files:
                raise
    if not picked:
        raise DatasetError(f"no readable training image in {index.name} to calibrate scoring with")
    return torch.stack(picked)


def run_score_scale(detector: Detector, run: RunDir, config: RunConfig, adapted_file: Path | None = None,
                    progress: bool = True) -> ScoreScale:
    """Calibrate ``detector`` (Eq. 9's maxima) on a seeded subset of the run's defect-free training images
    and return the scale. The result is kept in RUN_DIR/calibration/, keyed by everything it depends on
    (checkpoint, sampler, seed, extractor, feature settings, data), so later tests and predictions, also on
    a machine without the training data, reuse it."""
    detect = detector.config
    scoring = detect.scoring
    if detect.backend == "onnxruntime":  # the exported graphs are the networks
        networks = [_file_id(run.root / "export" / name) for name in ("unet.onnx", "extractor.onnx")]
    else:
        networks = [_file_id(run.resolve_checkpoint(detect.checkpoint)),
                    ["adapted", *_file_id(adapted_file)] if adapted_file is not None
                    else ["pretrained", detect.backbone, detect.backbone_weights]]
    key = {
        "networks": networks, "weights": detect.weights,
        "sampler": detect.sampler.to_dict(), "seed": detect.seed, "precision": detect.precision,
        "backend": detect.backend, "feature_layers": list(scoring.feature_layers),
        "patch_size": scoring.patch_size, "feature_size": scoring.feature_size,
        "images": scoring.calibration_images, "data": config.data.to_dict(),
    }
    if scoring.normalization == "positional":  # only then, so scales stored before positional keep their key
        key["normalization"] = "positional"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = run.root / "calibration" / f"scale-{digest}.json"
    maps_path = path.with_suffix(".safetensors")  # positional: the per-pixel means, written before the JSON
    if path.is_file():
        stored = json.loads(path.read_text())["scale"]
        if not stored.pop("positional", False):
            detector.score_scale = ScoreScale(**stored)
            return detector.score_scale
        if maps_path.is_file():
            detector.score_scale = ScoreScale(**stored, **load_file(str(maps_path)))
            return detector.score_scale
    images = calibration_images(config, scoring.calibration_images, detect.seed)
    n = len(images)
    bar = tqdm(total=n, desc="calibrate", unit="img", disable=not progress, dynamic_ncols=True, leave=False)
    scale = detector.calibrate(images, progress=bar.update)
    bar.close()
    if scale.positional:
        atomic_write(maps_path, lambda tmp: save_file({k: v.contiguous() for k, v in scale.maps().items()}, tmp))
    atomic_write_text(path, json.dumps({"scale": scale.to_dict(), "key": key}, indent=2, default=str))
    return scale


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Pass scores as floats: csv writes them exactly (repr), so comparing them with threshold.json gives
    the same decisions as the run made."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


@dataclass
class TestSplit:
    """A dataset's test images as tensors, in index order."""

    samples: list
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    masks: torch.Tensor  # (N, 1, H, W) of 0/1
    labels: np.ndarray  # (N,)
    has_masks: bool
    name: str


def load_test_split(run: RunDir, config: RunConfig, progress: bool = True) -> TestSplit:
    index = build_index(config.data)
    if not index.test:
        raise DatasetError(f"{index.name} has no test images")
    dataset = ImageSet(index.test, config.data.image_size, config.data.channels, cache=True)
    if config.data.skip_bad_files:
        from .api import report_skipped

        report_skipped(run, dataset.drop_unreadable(), "test")
    items = [dataset[i] for i in tqdm(range(len(dataset)), desc="loading test images", unit="img",
                                      disable=not progress, leave=False)]
    return TestSplit(
        samples=list(dataset.samples),
        images=torch.stack([it["image"] for it in items]),
        masks=torch.stack([it["mask"] for it in items]),
        labels=np.array([it["label"] for it in items]),
        has_masks=index.has_masks,
        name=index.name,
    )


def _cache_key(run: RunDir, detect: DetectConfig, config: RunConfig, samples: list) -> str:
    key = {
        "checkpoint": _file_id(run.resolve_checkpoint(detect.checkpoint)), "weights": detect.weights,
        "sampler": detect.sampler.to_dict(), "seed": detect.seed, "precision": detect.precision,
        "backend": detect.backend,
        "data": config.data.to_dict(), "images": [str(s.image) for s in samples],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def reconstruct_split(detector: Detector, run: RunDir, config: RunConfig, split: TestSplit,
                      cache: bool = True, progress: bool = True) -> torch.Tensor:
    """x0 for every test image; stored in RUN_DIR/cache so that rescoring never re-runs the diffusion
    (the key covers the checkpoint, sampler settings, seed, data and image list)."""
    path = run.root / "cache" / f"recon-{_cache_key(run, detector.config, config, split.samples)}.safetensors"
    if cache and path.is_file():
        return load_file(str(path))["reconstruction"]
    out = []
    bs = detector.config.batch_size
    bar = tqdm(total=len(split.images), desc="reconstruct", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(split.images), bs):
        out.append(detector.reconstruct(split.images[start:start + bs]).cpu())
        bar.update(len(out[-1]))
    bar.close()
    recon = torch.cat(out)
    if cache:
        atomic_write(path, lambda tmp: save_file({"reconstruction": recon.contiguous()}, tmp))
    return recon


def score_split(detector: Detector, split: TestSplit, recon: torch.Tensor) -> DetectionResult:
    """Score all test images against their reconstructions, batch by batch."""
    bs = detector.config.batch_size
    parts = [detector.score(split.images[i:i + bs], recon[i:i + bs]) for i in range(0, len(split.images), bs)]
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return DetectionResult(score=cat("score"), anomaly_map=cat("anomaly_map"), reconstruction=recon,
                           pixel_distance=cat("pixel_distance"), feature_distance=cat("feature_distance"))


def split_metrics(split: TestSplit, scores: np.ndarray, maps: torch.Tensor, crop_fraction: float,
                  curves: dict | None = None) -> dict:
    """image AUROC, pixel AUROC and PRO (None where the data cannot give them). If ``curves`` is a
    dict, the PRO curve (thinned to a few hundred points) is stored in it."""
    cropped_maps = crop(maps, crop_fraction)[:, 0].numpy()
    cropped_masks = crop(split.masks, crop_fraction)[:, 0].numpy() > 0.5
    has_masks = split.has_masks and bool(cropped_masks.any())
    pro = None
    if has_masks:
        curve = pro_curve(cropped_maps, cropped_masks, PRO_LIMIT)
        if curve is not None:
            pro = area_up_to(curve[0], curve[1], PRO_LIMIT) / PRO_LIMIT
            if curves is not None:
                from .report import thin

                xs, ys = thin(*curve)
                curves["pro"] = {"fpr": xs, "pro": ys}
    return {
        "image_auroc": roc_auc(scores, split.labels),
        "pixel_auroc": pixel_auroc(cropped_maps, cropped_masks) if has_masks else None,
        "pro": pro,
    }


def test_run(
    run: RunDir,
    detect: DetectConfig | None = None,
    out_dir: Path | None = None,
    save_images: bool = True,
    progress: bool = True,
    cache: bool = True,
) -> dict:
    """Evaluate the run on its dataset's test split; returns the metrics dict it writes."""
    t0 = time.perf_counter()
    detector, config = load_detector(run, detect, progress=progress)
    detect = detector.config
    out_dir = Path(out_dir) if out_dir else run.test_dir
    split = load_test_split(run, config, progress)
    recon = reconstruct_split(detector, run, config, split, cache=cache, progress=progress)
    result = score_split(detector, split, recon)
    score = result.score.numpy()
    curves: dict = {}
    metrics = {
        "dataset": split.name,
        "n_images": int(len(score)),
        "n_defective": int(split.labels.sum()),
        **split_metrics(split, score, result.anomaly_map, detect.crop, curves),
        "threshold": f1_optimal_threshold(score, split.labels),
        "extractor": None if detector.extractor is None else (
            "adapted" if detect.adapted and _has_adapted(run) else "pretrained"),
        "seconds": time.perf_counter() - t0,
        "detect": detect.to_dict(),
        "score_scale": None if detector.score_scale is None else detector.score_scale.to_dict(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(out_dir / "curves.json", json.dumps(curves))
    samples = split.samples
    names = [f"{_safe_name(s.defect_type)}_{_safe_name(s.image.stem)}" for s in samples]
    write_csv(out_dir / "scores.csv", ["image", "defect_type", "label", "score"],
               [(str(s.image), s.defect_type, s.label, float(v)) for s, v in zip(samples, score)])
    if metrics["threshold"] is not None:
        atomic_write_text(run.root / "threshold.json", json.dumps(
            {"threshold": metrics["threshold"], "source": "F1-optimal on the test split", "detect": detect.to_dict()},
            indent=2))
    if save_images:
        amap = result.anomaly_map
        # Colour scale shared by all panels: the median map value is "cold", the 99.9th percentile "hot".
        vmin, vmax = (float(q) for q in np.quantile(amap.numpy(), [0.5, 0.999]))
        image_dir = out_dir / "images"
        for i, s in enumerate(tqdm(samples, desc="images", unit="img", disable=not progress, leave=False)):
            title = f"{s.defect_type}/{s.image.name}  score {score[i]:.4g}"
            save_png(panel(split.images[i], recon[i], amap[i], split.masks[i] if s.mask is not None or s.label == 0
                           else None, title, vmin, vmax), image_dir / f"{names[i]}.png")
    return metrics


def _has_adapted(run: RunDir) -> bool:
    from .adaptation import adapted_checkpoints

    return bool(adapted_checkpoints(run))


def sweep(
    run: RunDir,
    ws: Sequence[float],
    vs: Sequence[float],
    modes: Sequence[str] = ("pixel", "feature", "combined"),
    extractors: Sequence[str] = ("pretrained", "adapted"),
    detect: DetectConfig | None = None,
    progress: bool = True,
) -> list[dict]:
    """Metrics over a grid of w, v, scoring mode and extractor. The diffusion runs once per w
    (cached), the backbone once per (w, extractor); v and the mode only rescore stored distances.
    Combined scoring with calibrated normalisation is calibrated once per (w, extractor) (cached too)."""
    from .adaptation import adapted_checkpoint, load_adapted_extractor
    from .backbones import create_backbone
    from .scoring import anomaly_map, image_scores

    config = run.load_config()
    base = detect or config.detect
    split = load_test_split(run, config, progress)
    check_trained_timestep(config.train, base.sampler.start_step, base.force_timestep)
    device = resolve_device(base.device)
    unet = run.load_unet(device, base.checkpoint, base.weights)
    need_features = any(m != "pixel" for m in modes)
    feature_extractors: dict[str, tuple[object, Path | None]] = {}  # name -> (extractor, adapted file)
    if need_features:
        for name in extractors:
            if name == "adapted":
                path = adapted_checkpoint(run, base.adapted_epoch)
                if path is None:
                    continue
                feature_extractors[name] = (load_adapted_extractor(path, base.backbone, base.scoring.feature_layers), path)
            else:
                feature_extractors[name] = (create_backbone(base.backbone, base.scoring.feature_layers,
                                                            base.backbone_weights, base.allow_download), None)
    rows = []
    for w in ws:
        det_cfg = with_overrides(base, w=float(w), mode="pixel")
        detector = Detector(unet, det_cfg, config.schedule, device=device)
        recon = reconstruct_split(detector, run, config, split, progress=progress)
        pix = score_split(detector, split, recon).pixel_distance
        ext_names = list(feature_extractors) if feature_extractors else ["-"]
        for ext_index, ext_name in enumerate(ext_names):
            d_f = scale = None
            if ext_name != "-":
                extractor, adapted_file = feature_extractors[ext_name]
                fdet = Detector(unet, with_overrides(base, w=float(w), mode="feature"), config.schedule,
                                extractor=extractor, device=device)
                d_f = score_split(fdet, split, recon).feature_distance
                if "combined" in modes and base.scoring.normalization in CALIBRATED_NORMALIZATIONS:
                    scale = run_score_scale(fdet, run, config, adapted_file, progress=progress)
            for mode in modes:
                if mode != "pixel" and d_f is None:
                    continue
                if mode == "pixel" and ext_index > 0:
                    continue  # pixel-only does not depend on the extractor
                for v in (vs if mode == "combined" else [None]):
                    scoring = replace(base.scoring, mode=mode, v=float(v) if v is not None else base.scoring.v)
                    maps = anomaly_map(pix, d_f, scoring, scale)
                    scores = image_scores(maps, base.crop).numpy()
                    rows.append({"w": float(w), "mode": mode, "v": v,
                                 "extractor": ext_name if mode != "pixel" else "-",
                                 **split_metrics(split, scores, maps, base.crop)})
    return rows


def collect_images(paths: Sequence[Path | str]) -> list[Path]:
    """Files as given, and image files inside given folders (recursively), in a stable order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if is_image_file(q)))
        elif p.is_file():
            found.append(p)
        else:
            raise DatasetError(f"no such file or folder: {p}")
    if not found:
        raise DatasetError(f"no images found in {', '.join(map(str, paths))}")
    return found


def stored_threshold(run: RunDir) -> float | None:
    path = run.root / "threshold.json"
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["threshold"])


def predict(
    run: RunDir,
    paths: Sequence[Path | str],
    out_dir: Path,
    threshold: float | None = None,
    detect: DetectConfig | None = None,
    save_images: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Score unlabelled images; writes OUT/scores.csv and heatmap PNGs. Returns one dict per image."""
    files = collect_images(paths)
    detector, config = load_detector(run, detect, progress=progress)
    if threshold is None:
        threshold = stored_threshold(run)
    size, channels = config.data.image_size, config.data.channels
    out_dir = Path(out_dir)
    rows: list[dict] = []
    bs = detector.config.batch_size
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    results = []
    for start in range(0, len(files), bs):
        chunk = files[start:start + bs]
        images = torch.stack([read_image(p, channels, size) for p in chunk])
        res = detector(images)
        for j, p in enumerate(chunk):
            score = float(res.score[j])
            decision = None if threshold is None else ("defective" if score >= threshold else "good")
            rows.append({"image": str(p), "score": score, "decision": decision})
            results.append((p, images[j], res.reconstruction[j], res.anomaly_map[j], score, decision))
        bar.update(len(chunk))
    bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "scores.csv", ["image", "score", "decision"],
               [(r["image"], float(r["score"]), r["decision"] or "") for r in rows])
    if save_images and results:
        all_maps = torch.stack([r[3] for r in results])
        vmin, vmax = float(all_maps.min()), float(all_maps.max())
        if threshold is not None:
            vmax = max(vmax, threshold)
        used: set[str] = set()
        for p, img, rec, amap, score, decision in results:
            name = _safe_name(p.stem)
            while name in used:
                name += "_"
            used.add(name)
            title = f"{p.name}  score {score:.4g}" + (f"  -> {decision}" if decision else "")
            save_png(panel(img, rec, amap, None, title, vmin, vmax), out_dir / "images" / f"{name}.png")
    return rows


def with_overrides(detect: DetectConfig, **changes) -> DetectConfig:
    """``detect`` with sampler/scoring/top-level fields replaced (None values ignored)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    sampler_fields = {"start_step", "skip", "w", "eta", "authors_first_step"}
    scoring_fields = {"mode", "v", "sigma", "feature_layers", "normalization", "patch_size", "feature_size"}
    sampler = replace(detect.sampler, **{k: v for k, v in changes.items() if k in sampler_fields})
    scoring = replace(detect.scoring, **{k: v for k, v in changes.items() if k in scoring_fields})
    top = {k: v for k, v in changes.items() if k not in sampler_fields | scoring_fields}
    if "adapted_epoch" in top:
        top.setdefault("adapted", True)
    return replace(detect, sampler=sampler, scoring=scoring, **top)

