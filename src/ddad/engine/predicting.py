"""``ddad predict`` for any method: score unlabelled images and decide with the run's threshold.

    OUT/scores.csv         image, score, decision (defective | good; empty without a threshold), error
                           (why a file was not scored: it could not be read)
    OUT/images/<name>.png  input | reconstruction | heatmap

The threshold is the one given, else the run's stored one, which must have been chosen under this
detector's calibration key (``ddad test`` with the same detection settings).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.io import DatasetError, read_image
from ..data.splits import collect_images
from ..results import safe_name
from ..runs import RunDir
from ..visualize import colour_range, panel, save_png
from .calibration import stored_threshold
from .detection import LoadedDetector
from .testing import write_csv


def predict(run: RunDir, loaded: LoadedDetector, paths: Sequence[Path | str], out_dir: Path,
            threshold: float | None = None, save_images: bool = True, progress: bool = True,
            exclude: Sequence[str] = ()) -> list[dict]:
    """Score the images in ``paths`` (files or folders; in folders without the ``exclude`` globs and the
    masks of the run's dataset format). Writes OUT/scores.csv (unreadable files listed with the reason, not
    scored) and heatmap PNGs, replacing the ones of an earlier predict there; returns one dict per file."""
    files = collect_images(paths, exclude, loaded.data.dataset)
    stored = stored_threshold(run, loaded.key, f"Run `ddad test {run.root}` with the same detection flags as "
                                               f"this predict to store one") if threshold is None else None
    if stored is not None:
        threshold = float(stored["threshold"])
    size, channels = loaded.data.image_size, loaded.data.channels
    out_dir = Path(out_dir)
    rows: list[dict] = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    results = []
    pending: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        res = loaded.detect(torch.stack([img for _, img in pending]))
        for j, (p, img) in enumerate(pending):
            score = float(res.pred_score[j])
            decision = None if threshold is None else ("defective" if score >= threshold else "good")
            rows.append({"image": str(p), "score": score, "decision": decision, "error": None})
            recon = None if res.reconstruction is None else res.reconstruction[j]
            results.append((p, img, recon, res.anomaly_map[j], score, decision))
        bar.update(len(pending))
        pending.clear()

    for p in files:
        try:
            pending.append((p, read_image(p, channels, size)))
        except DatasetError as exc:  # one bad file does not stop the others
            rows.append({"image": str(p), "score": None, "decision": None, "error": str(exc)})
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
    write_csv(out_dir / "scores.csv", ["image", "score", "decision", "error"],
              [(r["image"], "" if r["score"] is None else float(r["score"]), r["decision"] or "", r["error"] or "")
               for r in rows])
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
