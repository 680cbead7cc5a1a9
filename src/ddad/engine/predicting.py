"""``ddad predict`` for any method: score unlabelled images and decide with the run's threshold.

    OUT/scores.csv         image, score, decision (defective | good; empty without a threshold)
    OUT/images/<name>.png  input | reconstruction | heatmap

The threshold is the one given, else the run's stored one, which must have been chosen under this
detector's calibration key (``ddad test`` with the same detection settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.io import read_image
from ..data.splits import collect_images
from ..results import safe_name
from ..runs import RunDir
from ..visualize import panel, save_png
from .calibration import stored_threshold
from .detection import LoadedDetector
from .testing import write_csv


def predict(run: RunDir, loaded: LoadedDetector, paths: Sequence[Path | str], out_dir: Path,
            threshold: float | None = None, save_images: bool = True, progress: bool = True) -> list[dict]:
    """Score the images in ``paths`` (files or folders); writes OUT/scores.csv and heatmap PNGs and returns
    one dict per image (image, score, decision)."""
    files = collect_images(paths)
    if threshold is None:
        threshold = stored_threshold(run, loaded.key, f"Run `ddad test {run.root}` with the same detection flags "
                                                      f"as this predict to store one")
    size, channels = loaded.data.image_size, loaded.data.channels
    out_dir = Path(out_dir)
    rows: list[dict] = []
    bs = loaded.batch_size
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    results = []
    for start in range(0, len(files), bs):
        chunk = files[start:start + bs]
        images = torch.stack([read_image(p, channels, size) for p in chunk])
        res = loaded.detect(images)
        for j, p in enumerate(chunk):
            score = float(res.pred_score[j])
            decision = None if threshold is None else ("defective" if score >= threshold else "good")
            rows.append({"image": str(p), "score": score, "decision": decision})
            recon = None if res.reconstruction is None else res.reconstruction[j]
            results.append((p, images[j], recon, res.anomaly_map[j], score, decision))
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
            name = safe_name(p.stem)
            while name in used:
                name += "_"
            used.add(name)
            title = f"{p.name}  score {score:.4g}" + (f"  -> {decision}" if decision else "")
            save_png(panel(img, rec, amap, None, title, vmin, vmax), out_dir / "images" / f"{name}.png")
    return rows
