"""Bit-for-bit comparison of two ``ddad test`` outputs (metrics.json and scores.csv): the check that a
change keeps every DDAD figure. Exit 0 when identical, 1 otherwise, with what differs.

    python benchmarks/same_scores.py BEFORE_TEST_DIR AFTER_TEST_DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

METRICS = ("image_auroc", "pixel_auroc", "pro", "threshold", "n_images", "n_defective")


def compare(before: Path, after: Path) -> list[str]:
    differences = []
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (before, after))
    differences += [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in METRICS if a.get(k) != b.get(k)]
    rows_a, rows_b = (list(csv.DictReader(open(d / "scores.csv", newline=""))) for d in (before, after))
    if len(rows_a) != len(rows_b):
        return differences + [f"{len(rows_a)} images != {len(rows_b)}"]
    for ra, rb in zip(rows_a, rows_b):
        if Path(ra["image"]).name != Path(rb["image"]).name or ra["score"] != rb["score"]:
            differences.append(f"{ra['image']}: {ra['score']} != {rb['image']}: {rb['score']}")
    return differences


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    args = p.parse_args()
    differences = compare(args.before, args.after)
    n = len(list(csv.DictReader(open(args.before / "scores.csv", newline=""))))
    if differences:
        print("\n".join(differences))
        sys.exit(1)
    print(f"identical: {', '.join(METRICS)} and all {n} scores, bit for bit")


if __name__ == "__main__":
    main()
