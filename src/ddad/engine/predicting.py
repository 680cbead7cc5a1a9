"""``ddad predict`` for any method: score unlabelled images and decide with the run's threshold.

    OUT/scores.csv         image, score, pred_score (normalised: 0.5 at the threshold), pred_label (1 defective,
                           0 good), decision (defective | good; empty without a threshold), error (why a file
                           was not scored: it could not be read)
    OUT/images/<name>.png  input | reconstruction | heatmap
    OUT/masks/<name>.png   with ``masks``: the binary pred_mask (anomaly map >= the stored pixel threshold)

The threshold is the one given, else the run's stored one, which must have been chosen under this
detector's calibration key (``ddad test`` with the same detection settings).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

import numpy as np
from PIL import Image

from ..data.io import DatasetError, image_size_of, read_image
from ..data.splits import collect_images
from ..results import safe_name
from ..runs import RunDir
from ..visualize import colour_range, panel, save_png
from .calibration import stored_threshold
from .detection import LoadedDetector
from .testing import write_csv
from .thresholds import Threshold


def predict(run: RunDir, loaded: LoadedDetector, paths: Sequence[Path | str], out_dir: Path,
            threshold: float | None = None, save_images: bool = True, progress: bool = True,
            exclude: Sequence[str] = (), masks: bool = False) -> list[dict]:
    """Score the images in ``paths`` (files or folders; in folders without the ``exclude`` globs and the
    masks of the run's dataset format). Writes OUT/scores.csv (unreadable files listed with the reason, not
    scored) and heatmap PNGs, replacing the ones of an earlier predict there; returns one dict per file."""
    files = collect_images(paths, exclude, loaded.data.dataset)
    stored = stored_threshold(run, loaded.key, f"Run `ddad test {run.root}` with the same detection flags as "
                                               f"this predict to store one") if threshold is None else None
    if stored is not None:
        threshold = float(stored["threshold"])
    normaliser = None  # pred_score needs the validation score range stored with the threshold
    if threshold is not None:
        low, high = (stored or {}).get("validation_range") or (None, None)
        if low is not None:
            normaliser = Threshold(threshold, stored["source"], stored.get("target") or {}, low, high)
    pixel_threshold = (stored or {}).get("pixel_threshold")
    if masks and pixel_threshold is None:
        raise ValueError(f"--masks needs a pixel threshold: run `ddad test {run.root}` (with a validation split) "
                         "with the same detection flags first")
    size, channels = loaded.data.image_size, loaded.data.channels
    out_dir = Path(out_dir)
    rows: list[dict] = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    results = []
    pending: list[tuple[Path, torch.Tensor]] = []
    mask_paths: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        res = loaded.detect(torch.stack([img for _, img in pending]))
        for j, (p, img) in enumerate(pending):
            score = float(res.pred_score[j])
            decision = None if threshold is None else ("defective" if score >= threshold else "good")
            rows.append({"image": str(p), "score": score, "decision": decision, "error": None,
                         "pred_score": None if normaliser is None else float(normaliser.normalise(score)),
                         "pred_label": None if threshold is None else int(score >= threshold)})
            recon = None if res.reconstruction is None else res.reconstruction[j]
            results.append((p, img, recon, res.anomaly_map[j], score, decision))
            if masks:
                mask = (res.anomaly_map[j, 0].numpy() >= pixel_threshold).astype(np.uint8) * 255
                mask_paths.append((p, mask))
        bar.update(len(pending))
        pending.clear()

    for p in files:
        try:
            pending.append((p, read_image(p, channels, size)))
        except DatasetError as exc:  # one bad file does not stop the others
            rows.append({"image": str(p), "score": None, "decision": None, "error": str(exc), "pred_score": None,
                         "pred_label": None})
            bar.update(1)
        if len(pending) == loaded.batch_size:
            flush()
    if pending:
        flush()
    bar.close()
    order = {str(p): i for i, p in enumerate(files)}
    rows.sort(key=lambda r: order[r["image"]])
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "images").glob("*.png"):  # panels of an earlier predict into this folder
        stale.unlink()
    blank = lambda v: "" if v is None else v  # noqa: E731
    write_csv(out_dir / "scores.csv", ["image", "score", "pred_score", "pred_label", "decision", "error"],
              [(r["image"], blank(r["score"]), blank(r["pred_score"]), blank(r["pred_label"]), r["decision"] or "",
                r["error"] or "") for r in rows])
    for stale in (out_dir / "masks").glob("*.png"):
        stale.unlink()
    names: set[str] = set()
    for p, mask in mask_paths:
        name = safe_name(p.stem)
        while name in names:
            name += "_"
        names.add(name)
        (out_dir / "masks").mkdir(parents=True, exist_ok=True)
        height, width = image_size_of(p)  # at the image's own size, as masks of the dataset formats
        save_png(Image.fromarray(mask).resize((width, height), Image.NEAREST), out_dir / "masks" / f"{name}.png")
    skipped = [r for r in rows if r["error"]]
    if skipped:
        print(f"warning: {len(skipped)} of {len(files)} files could not be read and were not scored "
              f"(listed in {out_dir / 'scores.csv'} with the reason):", file=sys.stderr)
        for r in skipped[:10]:
            print(f"  {r['error']}", file=sys.stderr)
    if save_images and results:
        # the colour scale of the `ddad test` that chose the threshold, so heatmaps compare across both
        colours = (stored or {}).get("colour_scale") or colour_range(torch.stack([r[3] for r in results]))
        used: set[str] = set()
        for p, img, rec, amap, score, decision in results:
            name = safe_name(p.stem)
            while name in used:
                name += "_"
            used.add(name)
            title = f"{p.name}  score {score:.4g}" + (f"  -> {decision}" if decision else "")
            save_png(panel(img, rec, amap, None, title, *colours, threshold=threshold), out_dir / "images" / f"{name}.png")
    return rows
