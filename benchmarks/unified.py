"""The unified multi-category benchmark (issue 17): 13 real categories of ../shared/data as one dataset.

    python benchmarks/unified.py layout OUT             # OUT/<category>/... in the MVTec layout (symlinks)
    ddad train --method drdc --data-root OUT --category all --image-size 224 --minutes 10 --run-dir RUN
    ddad test RUN --no-images                          # per category and mean
    python benchmarks/unified.py latency RUN [--set steps=5]   # ms per image at batch 1, peak memory
    python benchmarks/unified.py patchcore OUT --out benchmarks/results/unified/patchcore.json
    python benchmarks/unified.py curve 5=A/metrics.json 10=B/metrics.json --patchcore P.json --out curve.png
    python benchmarks/unified.py with-refiner BASE_RUN RUN --step 270 --refine-steps 310   # DRDC part 2
    python benchmarks/unified.py subset RUN SUB --categories kolektorsdd,metal_plate      # test some categories

mtd and kolektorsdd are split as ddad splits them (seeded 80 % of the defect-free images train); mpdd's
metal_plate and the ten deeppcb board groups are in the MVTec layout already. Grey images are read as RGB.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MOBILENET = SHARED.parent / "weights" / "mobilenet_v2-b0353104.pth"


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src.resolve())


def cmd_layout(args) -> None:
    from ddad.data.formats import DataConfig, build_index

    out = Path(args.out)
    for name, dataset in (("mtd", "mtd"), ("kolektorsdd", "kolektorsdd")):
        index = build_index(DataConfig(dataset=dataset, root=str(SHARED / name)))
        for s in index.train:
            _link(s.image, out / name / "train" / "good" / f"{s.image.parent.name}_{s.image.name}")
        for s in index.test:
            stem = f"{s.image.parent.name}_{s.image.stem}"
            _link(s.image, out / name / "test" / s.defect_type / f"{stem}{s.image.suffix}")
            if s.mask is not None:
                _link(s.mask, out / name / "ground_truth" / s.defect_type / f"{stem}_mask{s.mask.suffix}")
    _link(SHARED / "mpdd" / "metal_plate", out / "metal_plate")
    for group in sorted((SHARED / "deeppcb").iterdir()):
        if group.is_dir():
            _link(group, out / group.name)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


def cmd_latency(args) -> None:
    """Inference time per image at batch 1 (backbone included) and the process's peak memory."""
    from ddad import load_config
    from ddad.api import with_detection
    from ddad.config import parse_assignment
    from ddad.data.splits import load_test_split
    from ddad.methods import get_method
    from ddad.runs import RunDir

    run = RunDir(args.run_dir)
    changes: dict = {}
    for assignment in args.set:
        changes.update(parse_assignment(assignment))
    config = with_detection(load_config(run), **changes)
    loaded = get_method(config.method).load(run, config, progress=False)
    images = load_test_split(config.data, progress=False).images[: args.images]
    loaded.detect(images[:1])  # warm-up
    parts = _timed_parts(loaded.detect)
    t0 = time.perf_counter()
    for i in range(len(images)):
        loaded.detect(images[i:i + 1])
    ms = 1000 * (time.perf_counter() - t0) / len(images)
    row = {"run": str(run.root), "settings": changes, "ms_per_image_batch1": ms, "threads": torch.get_num_threads(),
           "parts_ms_per_image": {k: 1000 * v[0] / len(images) for k, v in parts.items()},
           "calls_per_image": {k: v[1] / len(images) for k, v in parts.items()},
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "date": str(date.today())}
    print(json.dumps(row))


def _timed_parts(detector) -> dict[str, list[float]]:
    """Seconds and calls of each network of a DRDC detector (backbone, base transformer, refinement UNet: one
    call per diffusion step), accumulated by forward hooks from now on."""
    parts: dict[str, list[float]] = {}
    for name in ("extractor", "model"):
        module = getattr(detector, name, None)
        if module is not None:
            _time_module(module, "backbone" if name == "extractor" else "base transformer", parts)
    refiner = getattr(detector, "refiner", None)
    if refiner is not None:
        _time_module(refiner.unet, "diffusion UNet (per step: divide by calls)", parts)
    return parts


def _time_module(module: torch.nn.Module, name: str, parts: dict) -> None:
    parts[name] = [0.0, 0]
    start: list[float] = []
    module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))

    def done(*_):
        parts[name][0] += time.perf_counter() - start.pop()
        parts[name][1] += 1

    module.register_forward_hook(done)


def cmd_patchcore(args) -> None:
    """PatchCore with one memory bank per category, and one bank for all categories (its unified form)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from patchcore import fit_bank, score_with_bank

    from ddad.backbones import create_backbone
    from ddad.data.formats import DataConfig, build_index
    from ddad.data.splits import load_test_split, load_train_images
    from ddad.engine.testing import split_metrics

    base = DataConfig(dataset="mvtec", root=str(args.root), category="all", image_size=args.image_size, channels=3,
                      val_ratio=0.0)  # the training set of the DRDC runs of BENCHMARKS.md
    categories = build_index(base).categories
    tested = args.test_categories.split(",") if args.test_categories else categories
    extractor = create_backbone("mobilenet_v2", (2, 3), weights=str(MOBILENET) if MOBILENET.is_file() else None)
    rows = []

    def evaluate(setting: str, train_data: DataConfig, test_categories: list[str]) -> None:
        train = load_train_images(train_data, progress=False)
        t0 = time.perf_counter()
        bank = fit_bank(extractor, train, args.fraction, presample=args.presample)
        fit_s = time.perf_counter() - t0
        for category in test_categories:
            split = load_test_split(replace(base, category=category), progress=False)
            t0 = time.perf_counter()
            scores, maps = score_with_bank(extractor, bank, split.images, 4.0 * args.image_size / 256, 1.0)
            ms = 1000 * (time.perf_counter() - t0) / len(split.images)
            rows.append({"setting": setting, "category": category, "train_images": len(train),
                         **asdict(split_metrics(split, scores.numpy(), maps, 1.0)), "fit_s": fit_s,
                         "bank": len(bank), "presample": args.presample, "fraction": args.fraction,
                         "ms_per_image_batch": ms, "date": str(date.today())})
            print(json.dumps(rows[-1]), flush=True)

    if args.unified:
        evaluate("one bank for all", base, tested)
    else:
        for category in tested:
            evaluate("per category", replace(base, category=category), [category])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


def cmd_with_refiner(args) -> None:
    """A new run with the base model of ``args.base`` at step ``args.step`` and the CPU refinement settings,
    to be trained by ``ddad train --resume --run-dir OUT`` (the base is done; the refiner trains)."""
    import os
    import shutil

    from ddad import load_config
    from ddad.config import merge
    from ddad.methods.drdc.settings import CPU_REFINEMENT, DRDCConfig

    base, out = Path(args.base), Path(args.out)
    data = merge(load_config(base).to_dict(), CPU_REFINEMENT)
    data["refine"].update(enabled=True, model_conditioning=not args.no_model_conditioning)
    data["train"]["max_steps"] = args.step
    data["refine_train"].update(max_steps=args.refine_steps, batch_size=16)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "cache").mkdir(exist_ok=True)
    (out / "config.yaml").write_text(DRDCConfig.from_dict(data).to_yaml())
    shutil.copy(base / "dataset.json", out / "dataset.json")
    for f in (base / "cache").iterdir():
        os.link(f, out / "cache" / f.name)
    found = [p for p in (base / "checkpoints").iterdir() if p.name.endswith(f"step-{args.step:07d}.safetensors")]
    if len(found) != 1:
        raise SystemExit(f"no single checkpoint of step {args.step} in {base / 'checkpoints'}")
    shutil.copy(found[0], out / "checkpoints" / found[0].name)
    print(f"wrote {out}: ddad train --resume --run-dir {out}")


def cmd_subset(args) -> None:
    """The run's models tested on some of its categories: OUT/config.yaml with data.category changed, and
    OUT/checkpoints (and OUT/banks) links to the run's. A unified model's per-category metrics do not depend on
    the others, except through a calibration (DRDC's Eq. 17 scale), which is taken again on the subset's
    held-out images."""
    from ddad import load_config

    run, out = Path(args.run), Path(args.out)
    config = load_config(run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config.replace(data=replace(config.data, category=args.categories)).to_yaml())
    for part in ("checkpoints", "banks"):  # the trained networks and a memory-bank base's banks
        link = out / part
        if (run / part).is_dir() and not link.exists():
            link.symlink_to((run / part).resolve(), target_is_directory=True)
    print(f"wrote {out}: ddad test {out}")


def cmd_curve(args) -> None:
    """Quality against training minutes: MINUTES=metrics.json pairs -> a JSON table and a PNG plot, with the
    per-category PatchCore mean as a line where ``--patchcore`` gives its rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for pair in args.points:
        minutes, path = pair.split("=", 1)
        mean = json.loads(Path(path).read_text())["category_mean"]
        points.append({"minutes": float(minutes), **{k: mean[k] for k in ("image_auroc", "pixel_auroc", "pro")}})
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {"image_auroc": "tab:blue", "pixel_auroc": "tab:orange", "pro": "tab:green"}
    for key, colour in colours.items():
        ax.plot([p["minutes"] for p in points], [p[key] for p in points], "o-", color=colour,
                label=f"DRDC base, unified: {key.replace('_', ' ')}")
    if args.patchcore:
        rows = json.loads(Path(args.patchcore).read_text())
        for key, colour in colours.items():
            ax.axhline(sum(r[key] for r in rows) / len(rows), color=colour, ls="--", lw=1,
                       label=f"PatchCore per category: {key.replace('_', ' ')}")
    ax.set_xlabel("training minutes (steps at the idle rate of CPU-2)")
    ax.set_ylabel("mean over 13 categories")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    print(json.dumps(points))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("layout")
    q.add_argument("out", type=Path)
    q = sub.add_parser("latency")
    q.add_argument("run_dir", type=Path)
    q.add_argument("--images", type=int, default=50)
    q.add_argument("--set", action="append", default=[], help="NAME=VALUE: a detection setting by name (steps=5)")
    q = sub.add_parser("patchcore")
    q.add_argument("root", type=Path)
    q.add_argument("--image-size", type=int, default=224)
    q.add_argument("--fraction", type=float, default=0.1)
    q.add_argument("--unified", action="store_true", help="one bank for all categories (default: one per category)")
    q.add_argument("--test-categories", help="a,b,c: test only these (the bank still holds every category)")
    q.add_argument("--presample", type=float, default=1.0,
                   help="choose the coreset among this random share of the patches (large banks on a CPU)")
    q.add_argument("--out", type=Path, required=True)
    q = sub.add_parser("with-refiner")
    q.add_argument("base", type=Path, help="a base-model run with a checkpoint at --step")
    q.add_argument("out", type=Path)
    q.add_argument("--step", type=int, required=True)
    q.add_argument("--refine-steps", type=int, required=True)
    q.add_argument("--no-model-conditioning", action="store_true")
    q = sub.add_parser("subset")
    q.add_argument("run", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("--categories", required=True, help="a,b,c")
    q = sub.add_parser("curve")
    q.add_argument("points", nargs="+", help="MINUTES=path/to/metrics.json")
    q.add_argument("--patchcore", type=Path, help="per-category PatchCore rows (a line for their mean)")
    q.add_argument("--out", type=Path, required=True, help="the PNG")
    args = p.parse_args()
    {"layout": cmd_layout, "latency": cmd_latency, "patchcore": cmd_patchcore, "curve": cmd_curve,
     "with-refiner": cmd_with_refiner, "subset": cmd_subset}[args.command](args)


if __name__ == "__main__":
    main()
