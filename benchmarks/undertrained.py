"""When is a model trained enough? Quality and training loss at step marks of one run (issue 28, wall 6).

    python benchmarks/undertrained.py OUT.json --marks 10,25,50,100,200,300 -- ddad-train-flags...

Trains once with ``ddad train``'s settings (the flags after ``--``) and a checkpoint at each mark, records
every step's loss, then tests each mark's checkpoint (the run's validation workflow) and writes, per mark:
the step, the mean loss of the last tenth of the steps so far (at least 10: the rule's window, see
:mod:`ddad.engine.undertraining`), whether the warm-up had ended, and image / pixel AUROC / PRO on test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from ddad.api import test_run, train_run
from ddad.cli import build_parser
from ddad.cli.settings import train_settings
from ddad.engine.undertraining import recent_loss


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--marks", default="10,25,50,100,200,300")
    ap.add_argument("--run-dir", type=Path, required=True)
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    marks = sorted(int(m) for m in args.marks.split(","))
    config = train_settings(build_parser().parse_args(["train", *flags, "--run-dir", str(args.run_dir)]))[0]
    training = config.refine_train if getattr(config, "features", None) is not None else config.train
    config = config.replace(train=replace(config.train, checkpoint_steps=tuple(marks), max_steps=marks[-1],
                                          keep_checkpoints=0))
    losses: list[float] = []
    t0 = time.perf_counter()
    train_run(config, args.run_dir, progress=False, on_step=lambda epoch, step, loss: losses.append(loss))
    out = {"command": " ".join(sys.argv), "date": date.today().isoformat(), "train_seconds": time.perf_counter() - t0,
           "warmup_steps": training.warmup_steps, "losses": losses, "marks": []}
    from ddad.api import load_config
    from ddad.runs import RunDir

    run = RunDir(args.run_dir)
    for mark in marks:
        (path,) = [p for _, p in run.checkpoints() if p.name.endswith(f"step-{mark:07d}.safetensors")]
        cfg = load_config(run)
        cfg = cfg.replace(weights=replace(cfg.weights, checkpoint=str(path)))
        metrics = test_run(run, cfg, args.run_dir / f"test-{mark}", save_images=False, progress=False).to_dict()
        figures = metrics.get("category_mean") or metrics
        row = {"step": mark, "recent_loss": recent_loss(losses[:mark]), "warmup_done": mark >= training.warmup_steps,
               **{k: figures[k] for k in ("image_auroc", "pixel_auroc", "pro")}}
        out["marks"].append(row)
        print(json.dumps(row), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
