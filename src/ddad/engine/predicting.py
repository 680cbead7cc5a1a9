"""``ddad predict`` for any method: score unlabelled images and decide with the run's threshold.

    OUT/scores.csv         image, panel and mask (their paths under OUT), category (and how it was known:
                           given | path | recognised), score, threshold and its source (how it was chosen, its
                           target and expected false-alarm rate), pred_score (normalised: 0.5 at the
                           threshold), pred_label (1 defective, 0 good), decision (defective | good), note (why
                           pred_score or the decision is empty), error (why a file was not scored: unreadable,
                           or too small for the model)
    OUT/images/<relative path>.png   input | reconstruction | heatmap, named by the image's path relative to
                           the folder given (a sub-folder stays a sub-folder), titled with it
    OUT/masks/<relative path>.png    with ``masks``: the binary pred_mask (anomaly map >= the pixel threshold)

Files in the given folders that are not images are listed in a note on stderr, not scored.

The threshold is the one given, else the run's stored one, which must have been chosen under this
detector's calibration key (``ddad test`` with the same detection settings). A model of several categories
decides each image with its category's own threshold and normalisation (chosen on that category's
validation images), and a per-category method scores it as its category (e.g. against its bank). The
category is the one given, else a folder of the image's path named like one of the run's categories, else
the one recognised from the image (:mod:`ddad.engine.recognition`); with none, the shared threshold.
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
from ..data.splits import collect_inputs
from ..results import safe_name
from ..runs import RunDir
from ..visualize import colour_range, panel, save_png
from .detection import LoadedDetector
from .testing import write_csv
from .inference import Inferencer


# scores.csv's columns, in order (a row of a file that could not be scored has only image and error)
COLUMNS = ("image", "panel", "mask", "category", "category_source", "score", "threshold", "threshold_source",
           "pred_score", "pred_label", "decision", "note", "error")


def panel_paths(files: Sequence[Path], names: dict[Path, str], folder: str = "images") -> dict[str, str]:
    """Each file's panel (or mask) path under OUT, keeping its name relative to the folder it was found in
    (``good/000.png`` -> ``images/good/000.png``), characters outside letters, digits, ``-_.`` replaced;
    names that still collide get ``-2``, ``-3``."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for p in files:
        parts = [safe_name(part) for part in Path(names[p]).with_suffix("").parts]
        base = "/".join([folder, *parts])
        name, n = f"{base}.png", 1
        while name in used:
            n += 1
            name = f"{base}-{n}.png"
        used.add(name)
        out[str(p)] = name
    return out


def category_from_path(path: Path, categories: Sequence[str]) -> str | None:
    """The nearest folder of ``path`` named like one of ``categories``, else None."""
    for part in reversed(Path(path).parent.parts):
        if part in categories:
            return part
    return None


def predict(run: RunDir, loaded: LoadedDetector, paths: Sequence[Path | str], out_dir: Path,
            threshold: float | None = None, save_images: bool = True, progress: bool = True,
            exclude: Sequence[str] = (), masks: bool = False, category: str | None = None) -> list[dict]:
    """Score the images in ``paths`` (files or folders; in folders without the ``exclude`` globs and the
    masks of the run's dataset format), each as ``category`` when given (see the module docstring). Writes
    OUT/scores.csv (unreadable files listed with the reason, not scored) and heatmap PNGs, replacing the
    ones of an earlier predict there; returns one dict per file."""
    if category is not None and category not in loaded.categories:
        raise ValueError(f"--category {category!r} is not one of this run's categories: "
                         f"{', '.join(loaded.categories) or 'none recorded'}")
    inputs = collect_inputs(paths, exclude, loaded.data.dataset)
    files = inputs.files
    if inputs.ignored:
        print(f"note: {len(inputs.ignored)} file(s) in the given folders are not images and were not scored: "
              + ", ".join(str(q) for q in inputs.ignored[:5]) + (" ..." if len(inputs.ignored) > 5 else ""),
              file=sys.stderr)
    model = Inferencer.from_run(run, loaded, threshold, progress)
    decisions, stored, note = model.decisions, model.stored, model.note
    smallest = max(8, loaded.data.image_size // 8)  # a smaller image is blown up from almost nothing
    if masks and (decisions is None or decisions.shared.pixel is None):
        raise ValueError(f"--masks needs a pixel threshold: run `ddad test {run.root}` (with a validation split) "
                         "with the same detection flags first")
    several = len(loaded.categories) > 1
    size, channels = loaded.data.image_size, loaded.data.channels
    out_dir = Path(out_dir)
    rows: list[dict] = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    results = []
    pending: list[tuple[Path, torch.Tensor, str | None, str]] = []  # path, image, category, how it was known
    mask_paths: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        images = torch.stack([img for _, img, _, _ in pending])
        cats = model.resolve(images, [item[2] for item in pending])
        res = model.decide(images, cats)
        for j, (p, img, given, known_by) in enumerate(pending):
            cat = cats[j]
            score = float(res.score[j])
            limit = None if decisions is None else decisions.of(cat).image.value
            rows.append({"image": str(p), "category": cat or "",
                         "category_source": (known_by if given is not None else "recognised" if several else "run")
                         if cat else "",
                         "score": score, "threshold": limit,
                         "threshold_source": None if decisions is None else decisions.of(cat).image.source,
                         "error": None, "note": note or None,
                         "pred_score": None if res.pred_score is None else float(res.pred_score[j]),
                         "decision": None if limit is None else ("defective" if res.pred_label[j] else "good"),
                         "pred_label": None if limit is None else int(res.pred_label[j])})
            recon = None if res.reconstruction is None else res.reconstruction[j]
            results.append((p, img, recon, res.anomaly_map[j], score, rows[-1]["decision"], limit))
            if masks:
                mask_paths.append((p, res.pred_mask[j, 0].numpy().astype(np.uint8) * 255))
        bar.update(len(pending))
        pending.clear()

    for p in files:
        try:
            height, width = image_size_of(p)
            if min(height, width) < smallest:
                raise DatasetError(f"{p}: {width}x{height} pixels is too small to score (this model sees {size} px "
                                   f"images; at least {smallest} px a side)")
            image = read_image(p, channels, size)
        except DatasetError as exc:  # one bad file does not stop the others
            rows.append({**dict.fromkeys(COLUMNS), "image": str(p), "category": "", "category_source": "",
                         "error": str(exc)})
            bar.update(1)
        else:
            from_path = category_from_path(p, loaded.categories) if several and category is None else None
            given = category if category is not None else from_path
            pending.append((p, image, given, "given" if category is not None else "path" if from_path else "run"))
        if len(pending) == loaded.batch_size:
            flush()
    if pending:
        flush()
    bar.close()
    order = {str(p): i for i, p in enumerate(files)}
    rows.sort(key=lambda r: order[r["image"]])
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "images").rglob("*.png"):  # panels of an earlier predict into this folder
        stale.unlink()
    blank = lambda v: "" if v is None else v  # noqa: E731
    panels = panel_paths(files, inputs.names) if save_images else {}
    mask_files = panel_paths([p for p, _ in mask_paths], inputs.names, "masks")
    for r in rows:
        r["panel"] = panels.get(r["image"]) if r["error"] is None else None
        r["mask"] = mask_files.get(r["image"])
    write_csv(out_dir / "scores.csv", COLUMNS, [[blank(r[c]) for c in COLUMNS] for r in rows])
    for stale in (out_dir / "masks").rglob("*.png"):
        stale.unlink()
    for p, mask in mask_paths:
        height, width = image_size_of(p)  # at the image's own size, as masks of the dataset formats
        save_png(Image.fromarray(mask).resize((width, height), Image.NEAREST), out_dir / mask_files[str(p)])
    skipped = [r for r in rows if r["error"]]
    if skipped:
        print(f"warning: {len(skipped)} of {len(files)} files could not be read and were not scored "
              f"(listed in {out_dir / 'scores.csv'} with the reason):", file=sys.stderr)
        for r in skipped[:10]:
            print(f"  {r['error']}", file=sys.stderr)
    if save_images and results:
        # the colour scale of the `ddad test` that chose the threshold, so heatmaps compare across both
        colours = (stored or {}).get("colour_scale") or colour_range(torch.stack([r[3] for r in results]))
        for p, img, rec, amap, score, decision, limit in results:
            title = f"{inputs.names[p]}  score {score:.4g}" + (f"  -> {decision}" if decision else "")
            save_png(panel(img, rec, amap, None, title, *colours, threshold=limit), out_dir / panels[str(p)])
    return rows
