"""The paper's Fig. 4 ablation on a trained run: pixel-only, feature-only with the pretrained
extractor, feature-only after domain adaptation, and the combination (Eq. 9), side by side.

    python benchmarks/ablation.py runs/mtd64-ddads --adapt-epochs 2 --w 3 --v 1

The diffusion runs once (reconstructions are cached in the run); adaptation runs ``--adapt-epochs``
epochs unless the run already has them. Prints a Markdown table and writes RUN_DIR/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ddad.api import adapt_run
from ddad.adaptation import adapted_checkpoints
from ddad.evaluation import sweep, with_overrides
from ddad.runs import RunDir


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--adapt-epochs", type=int, default=2)
    p.add_argument("--adapt-batch", type=int, default=16)
    p.add_argument("--lambda-dl", type=float, default=0.1)
    p.add_argument("--w", type=float, default=3.0)
    p.add_argument("--v", type=float, nargs="+", default=[1.0])
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    run = RunDir(args.run_dir).require()
    detect = with_overrides(run.load_config().detect, w=args.w)
    timings = {}

    t0 = time.perf_counter()
    rows = sweep(run, [args.w], args.v, ["pixel", "feature", "combined"], ["pretrained"], detect,
                 progress=not args.quiet)
    timings["pretrained_eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    have = [e for e, _ in adapted_checkpoints(run)]
    if not have or max(have) < args.adapt_epochs:
        adapt_run(run.root, {"epochs": args.adapt_epochs, "batch_size": args.adapt_batch, "lambda_dl": args.lambda_dl},
                  progress=not args.quiet)
    timings["adapt_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows += sweep(run, [args.w], args.v, ["feature", "combined"], ["adapted"],
                  with_overrides(detect, adapted_epoch=args.adapt_epochs), progress=not args.quiet)
    timings["adapted_eval_s"] = time.perf_counter() - t0

    def f(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    print("| scoring | extractor | v | image AUROC | pixel AUROC | PRO |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        v = "-" if r["v"] is None else f"{r['v']:g}"
        print(f"| {r['mode']} | {r['extractor']} | {v} | {f(r['image_auroc'])} | {f(r['pixel_auroc'])} | {f(r['pro'])} |")
    print(json.dumps(timings))
    (run.root / "ablation.json").write_text(json.dumps({"rows": rows, "timings": timings, "args": vars(args)},
                                                       indent=2, default=str))


if __name__ == "__main__":
    main()
