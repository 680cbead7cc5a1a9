"""``ddad-infer FOLDER IMAGES...``: score image files (or folders of them) with an exported model, without
torch; writes OUT/scores.csv (the columns of ``ddad predict``'s that an export can fill) and, with
``--masks``, each image's ``pred_mask`` as a PNG at the image's own size."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import BACKENDS
from .images import DatasetError, is_image_file, own_size_check
from .methods import load
from .model import ExportError

COLUMNS = ("image", "mask", "category", "score", "threshold", "threshold_source", "pred_score", "pred_label",
           "decision", "error")


def image_files(inputs: list[Path]) -> list[Path]:
    """The files named and the image files under the folders named, in order; a missing path is an error."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if is_image_file(q)))
        elif p.is_file():
            files.append(p)
        else:
            raise DatasetError(f"no such file or folder: {p}")
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ddad-infer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a folder written by `ddad export`")
    ap.add_argument("images", type=Path, nargs="+", help="image files or folders of them")
    ap.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default ./predictions)")
    ap.add_argument("--backend", choices=BACKENDS, help="default: the export's own format")
    ap.add_argument("--threads", type=int, help="CPU threads of the runtime (default: its own choice)")
    ap.add_argument("--category", help="the images' category, for a model with decisions per category")
    ap.add_argument("--masks", action="store_true", help="also write each pred_mask as OUT/masks/NAME.png")
    ap.add_argument("--int8", action="store_true", help="the INT8 graphs of `ddad export --int8` (OpenVINO)")
    args = ap.parse_args(argv)
    try:
        model = load(args.folder, args.backend or ("openvino" if args.int8 else None), args.threads,
                     "int8" if args.int8 else "fp32")
        files = image_files(args.images)
    except (ExportError, DatasetError, RuntimeError, ValueError) as exc:
        print(f"ddad-infer: error: {exc}", file=sys.stderr)
        return 2
    if args.masks and (model.decisions is None or model.decisions.shared.pixel is None):
        print("ddad-infer: error: --masks needs a pixel threshold in the export: run `ddad test` on the run "
              "(with a validation split), then export again", file=sys.stderr)
        return 2
    unreadable: list = []  # a bad file is reported, the others scored
    results = model.predict(files, args.category, unreadable)
    rows = [{"image": str(p), "error": error} for p, error in unreadable]
    args.out.mkdir(parents=True, exist_ok=True)
    decisions = model.decisions
    for r in results:
        row = {"image": r.image, "category": r.category or "", "score": r.score, "threshold": r.threshold,
               "threshold_source": None if decisions is None else decisions.of(r.category).image.source,
               "pred_score": r.pred_score, "pred_label": None if r.pred_label is None else int(r.pred_label),
               "decision": None if r.pred_label is None else ("defective" if r.pred_label else "good")}
        if args.masks and r.pred_mask is not None:
            mask = args.out / "masks" / f"{len(rows):05d}-{Path(r.image).stem}.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            with own_size_check(), Image.open(r.image) as source:  # the header only
                width, height = source.size
            Image.fromarray(r.pred_mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST).save(mask)
            row["mask"] = str(mask.relative_to(args.out))
        rows.append(row)
    order = {str(p): i for i, p in enumerate(files)}
    rows.sort(key=lambda row: order[row["image"]])
    with open(args.out / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([["" if row.get(c) is None else row.get(c) for c in COLUMNS] for row in rows])
    flagged = sum(1 for row in rows if row.get("decision") == "defective")
    errors = [row for row in rows if row.get("error")]
    print(f"scored {len(rows) - len(errors)} images" + (f"; {flagged} flagged defective" if decisions else
                                                       "; no decisions in this export (raw scores only)"))
    for row in errors[:10]:
        print(f"  not scored: {row['error']}", file=sys.stderr)
    print(f"scores: {args.out / 'scores.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
