"""``ddad test`` and ``ddad predict``: run the detector over images and write what a user reads.

test:    RUN_DIR/test/metrics.json, scores.csv, images/<type>_<name>.png; RUN_DIR/threshold.json
predict: OUT/scores.csv, OUT/images/<name>.png
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import atomic_write_text
from .config import RunConfig
from .data.dataset import ImageSet
from .data.formats import build_index
from .data.io import DatasetError, is_image_file, read_image
from .detection import DetectConfig, DetectionResult, Detector
from .metrics import f1_optimal_threshold, pixel_auroc, pro_auc, roc_auc
from .runs import RunDir
from .runtime import resolve_device
from .scoring import crop
from .visualize import panel, save_png


def load_detector(run: RunDir, detect: DetectConfig | None = None) -> tuple[Detector, RunConfig]:
    """The run's trained UNet wrapped in a :class:`Detector` with ``detect`` (default: the run's)."""
    config = run.load_config()
    detect = detect or config.detect
    device = resolve_device(detect.device)
    unet = run.load_unet(device)
    return Detector(unet, detect, config.schedule, device=device), config


def _batches(dataset: ImageSet, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def test_run(
    run: RunDir,
    detect: DetectConfig | None = None,
    out_dir: Path | None = None,
    save_images: bool = True,
    progress: bool = True,
) -> dict:
    """Evaluate the run on its dataset's test split; returns the metrics dict it writes."""
    detector, config = load_detector(run, detect)
    detect = detector.config
    index = build_index(config.data)
    if not index.test:
        raise DatasetError(f"{index.name} has no test images")
    out_dir = Path(out_dir) if out_dir else run.test_dir
    dataset = ImageSet(index.test, config.data.image_size, config.data.channels, cache=False)

    scores, labels, maps, masks, recons, images = [], [], [], [], [], []
    bar = tqdm(total=len(dataset), desc="test", unit="img", disable=not progress, dynamic_ncols=True)
    for batch in _batches(dataset, detect.batch_size):
        result: DetectionResult = detector(batch["image"])
        scores.append(result.score)
        labels.append(batch["label"])
        maps.append(result.anomaly_map)
        masks.append(batch["mask"])
        if save_images:
            recons.append(result.reconstruction.half())
            images.append(batch["image"].half())
        bar.update(len(batch["image"]))
    bar.close()
    score = torch.cat(scores).numpy()
    label = torch.cat(labels).numpy()
    amap = torch.cat(maps)
    mask = torch.cat(masks)
    cropped_maps = crop(amap, detect.crop)[:, 0].numpy()
    cropped_masks = crop(mask, detect.crop)[:, 0].numpy() > 0.5
    has_masks = index.has_masks and bool(cropped_masks.any())
    metrics = {
        "dataset": index.name,
        "n_images": int(len(score)),
        "n_defective": int(label.sum()),
        "image_auroc": roc_auc(score, label),
        "pixel_auroc": pixel_auroc(cropped_maps, cropped_masks) if has_masks else None,
        "pro": pro_auc(cropped_maps, cropped_masks) if has_masks else None,
        "threshold": f1_optimal_threshold(score, label),
        "detect": detect.to_dict(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    names = [f"{_safe_name(s.defect_type)}_{_safe_name(s.image.stem)}" for s in index.test]
    _write_csv(out_dir / "scores.csv", ["image", "defect_type", "label", "score"],
               [(str(s.image), s.defect_type, s.label, f"{float(v):.6g}") for s, v in zip(index.test, score)])
    if metrics["threshold"] is not None:
        atomic_write_text(run.root / "threshold.json", json.dumps(
            {"threshold": metrics["threshold"], "source": "F1-optimal on the test split", "detect": detect.to_dict()},
            indent=2))
    if save_images:
        # Colour scale shared by all panels: the median map value is "cold", the 99.9th percentile "hot".
        vmin, vmax = (float(q) for q in np.quantile(amap.numpy(), [0.5, 0.999]))
        image_dir = out_dir / "images"
        img_t, rec_t = torch.cat(images), torch.cat(recons)
        for i, s in enumerate(tqdm(index.test, desc="images", unit="img", disable=not progress, leave=False)):
            title = f"{s.defect_type}/{s.image.name}  score {score[i]:.4g}"
            save_png(panel(img_t[i], rec_t[i], amap[i], mask[i] if s.mask is not None or s.label == 0 else None,
                           title, vmin, vmax), image_dir / f"{names[i]}.png")
    return metrics


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
    detector, config = load_detector(run, detect)
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
    _write_csv(out_dir / "scores.csv", ["image", "score", "decision"],
               [(r["image"], f"{r['score']:.6g}", r["decision"] or "") for r in rows])
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
    scoring_fields = {"mode", "v", "sigma", "feature_layers", "normalize_over_batch", "patch_size"}
    sampler = replace(detect.sampler, **{k: v for k, v in changes.items() if k in sampler_fields})
    scoring = replace(detect.scoring, **{k: v for k, v in changes.items() if k in scoring_fields})
    top = {k: v for k, v in changes.items() if k not in sampler_fields | scoring_fields}
    return replace(detect, sampler=sampler, scoring=scoring, **top)

