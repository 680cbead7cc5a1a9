"""Honest decisions against oracle ones (issue 19): what a run's figures are worth when nothing is tuned on
the test split, side by side with the optimistic figures of settings and threshold tuned on it.

    python benchmarks/honest.py RUN --out benchmarks/results/honest/NAME.json [--grid v=1,2] [--target 0.05]

Rows, each on the run's test split:
- ``default``: the run's settings; the image threshold F1-optimal on validation defects (synthetic where the
  run has no real ones) and, apart, for ``--target`` false alarms on the good validation images;
- ``tuned``: the settings ``ddad tune`` chooses on the validation split (same objective: the mean of image and
  pixel AUROC there), thresholds chosen as above;
- ``oracle``: the settings best on the test split by the same objective, with the F1-optimal test threshold.
  A user cannot have these figures; the gap to ``tuned`` is how optimistic a test-tuned table is.

The run's config.yaml is left as it was (the tuned settings are applied in memory). The test split is read
only after every validation choice is made, as ``ddad test`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

from ddad.api import load_config
from ddad.data.splits import load_test_split
from ddad.engine import testing, tuning
from ddad.methods import get_method
from ddad.runs import RunDir


def summary(metrics) -> dict:
    """Threshold-free metrics (the category mean where the split has several) and the stored threshold's
    decisions on test."""
    d = metrics.to_dict()
    figures = d.get("category_mean") or d
    return {"image_auroc": figures["image_auroc"], "pixel_auroc": figures["pixel_auroc"], "pro": figures["pro"],
            "threshold_source": d["threshold_source"], "decision": d.get("decision"),
            "oracle_threshold": d.get("oracle_threshold")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--grid", action="append", default=[], help="NAME=V1,V2 (default: ddad tune's grid)")
    ap.add_argument("--target", type=float, default=0.05, help="false-alarm target of the second threshold")
    args = ap.parse_args(argv)

    run = RunDir(args.run_dir).require()
    config = load_config(run)
    method = get_method(config.method)
    grids = [tuning.parse_grid(args.grid)] if args.grid else list(tuning.GRIDS[config.method])
    names = tuning.setting_names(grids)
    load = lambda c: method.load(run, c, progress=False)  # noqa: E731
    out: dict = {"run": str(run.root), "method": config.method, "names": names,
                 "grids": [{k: list(v) for k, v in g.items()} for g in grids],
                 "target": args.target, "date": date.today().isoformat(), "command": " ".join(sys.argv)}
    t0 = time.perf_counter()

    # 1. Honest: everything chosen on the validation split (tuning first, as a user would).
    tuned, rows, out["rule"] = tuning.tune(run, config, load, grids, progress=False)
    out["validation_rows"] = rows
    out["tuned_settings"] = tuning.current_values(tuned, names)
    for name, cfg in (("default", config), ("tuned", tuned)):
        loaded = load(cfg)
        for suffix, target in (("f1", None), ("far", args.target)):
            metrics = testing.test_run(run, loaded, args.out.parent / "tests" / f"{args.out.stem}-{name}-{suffix}",
                                       save_images=False, progress=False, max_false_alarms=target)
            out[f"{name}_{suffix}"] = summary(metrics)
        print(f"{name} {out[f'{name}_f1']}", file=sys.stderr)

    # 2. Oracle: settings and threshold tuned on the test split.
    oracle_config, out["test_rows"], _ = tuning.search(config, load, grids, load_test_split(config.data, progress=False),
                                                    progress=False)  # the same objective, on test
    out["oracle_settings"] = tuning.current_values(oracle_config, names)
    metrics = testing.test_run(run, load(oracle_config),
                               args.out.parent / "tests" / f"{args.out.stem}-oracle", save_images=False,
                               progress=False)
    oracle = summary(metrics)
    out["oracle"] = {**oracle, "decision": oracle["oracle_threshold"]}
    out["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(table(out))


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(out: dict) -> str:
    lines = ["| decisions | settings | image AUROC | pixel AUROC | PRO | threshold | test false alarms | test misses |",
             "|---|---|---|---|---|---|---|---|"]
    for key, label in (("default_f1", "default, F1 on validation defects"),
                       ("default_far", f"default, <= {out['target']:g} false alarms on validation"),
                       ("tuned_f1", "tuned on validation, F1 on validation defects"),
                       ("tuned_far", f"tuned on validation, <= {out['target']:g} false alarms"),
                       ("oracle", "oracle: settings and threshold tuned on test")):
        row = out[key]
        settings = out["oracle_settings"] if key == "oracle" else (
            out["tuned_settings"] if key.startswith("tuned") else out["validation_rows"][0])
        settings = {k: settings[k] for k in out["names"]}
        d = row["decision"] or {}
        lines.append(f"| {label} | {settings} | {fmt(row['image_auroc'])} | {fmt(row['pixel_auroc'])} | "
                     f"{fmt(row['pro'])} | {row['threshold_source'] if key != 'oracle' else 'F1 on test'} | "
                     f"{fmt(d.get('false_alarm_rate'))} | {fmt(d.get('miss_rate'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
