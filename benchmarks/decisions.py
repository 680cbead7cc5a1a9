"""What per-category thresholds do on test, against one shared threshold, from a ``ddad test`` output folder
(its scores.csv, which holds each image's own threshold, and metrics.json, which holds the shared one).

    python benchmarks/decisions.py RUN/test [--markdown]

Prints, per category and in all, the false-alarm rate on the good test images and the miss rate on the
defective ones, with the category's own threshold and with the shared one.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def rates(rows: list[dict], threshold_of) -> tuple[float | None, float | None, int, int]:
    good = [r for r in rows if r["label"] == "0"]
    bad = [r for r in rows if r["label"] == "1"]
    fa = sum(float(r["score"]) >= threshold_of(r) for r in good)
    miss = sum(float(r["score"]) < threshold_of(r) for r in bad)
    return (fa / len(good) if good else None, miss / len(bad) if bad else None, len(good), len(bad))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test_dir", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = list(csv.DictReader(open(args.test_dir / "scores.csv")))
    metrics = json.loads((args.test_dir / "metrics.json").read_text())
    shared = float(metrics["threshold"])
    own = metrics.get("category_thresholds") or {}
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    print(f"target: {metrics.get('decision', {}).get('target')}; shared threshold {shared:.6g}")
    if args.markdown:
        print("| category | good / defective | own threshold | false alarms, own | misses, own | false alarms, shared "
              "| misses, shared |\n| --- | --- | --- | --- | --- | --- | --- |")
    for category in [*dict.fromkeys(r["category"] for r in rows), None]:
        part = rows if category is None else [r for r in rows if r["category"] == category]
        fa_own, miss_own, n_good, n_bad = rates(part, lambda r: float(r["threshold"]))
        fa_shared, miss_shared, _, _ = rates(part, lambda r: shared)
        limit = "" if category is None else f"{own.get(category, shared):.4g}"
        name = category if category is not None else "**all**"
        if args.markdown:
            print(f"| {name} | {n_good} / {n_bad} | {limit} | {pct(fa_own)} | {pct(miss_own)} | {pct(fa_shared)} | "
                  f"{pct(miss_shared)} |")
        else:
            print(f"{name:>12}  {n_good:4d}/{n_bad:<4d} own {limit:>8}: fa {pct(fa_own):>8} miss {pct(miss_own):>8}"
                  f"   shared: fa {pct(fa_shared):>8} miss {pct(miss_shared):>8}")


if __name__ == "__main__":
    main()
