"""Detection quality against training budget: ddad's default recipe vs the paper's, with PatchCore.

    python benchmarks/budget.py train --dataset mtd --data-root ../shared/data/mtd --recipe default \
        --minutes 5 10 25 --run-dir runs/budget-mtd64-default
    python benchmarks/budget.py eval --run-dir runs/budget-mtd64-default
    python benchmarks/budget.py patchcore --dataset mtd --data-root ../shared/data/mtd --out runs/pc-mtd64.json
    python benchmarks/budget.py plot runs/budget-* --patchcore runs/pc-mtd64.json --out benchmarks/results/x.png

A budget in minutes means "this many minutes of training on this machine with all its cores": it is
turned into optimizer steps with the recipe's own step time, measured here (``calibrate``: a few steps
on all cores, nothing else running). Training then stops at the largest budget and leaves a checkpoint
at each smaller one, so one run gives the whole curve, and runs may share the machine (one thread each)
without bending the budget. Each checkpoint is evaluated with the same detection settings, on the
whole test split: pixel-only and combined (Eq. 9) with pretrained MobileNetV2 (real ImageNet weights).

Setups (both 64 x 64 unless --image-size, grey for MTD and KolektorSDD)
  paper:   the paper's recipe (TrainConfig.recipe("paper"), batch 16 as the issue measured it) and the
           paper's DDAD-S UNet (attention at 32, 16, 8; dropout 0.3).
  default: ddad's recipe (TrainConfig()) and the ``compact`` UNet.
Detection for both: T' 250, skip 25 (10 steps), eta 1, w 3, v 1, Gaussian sigma 1 (4 scaled to 64 px),
no crop; ddad's default takes its EMA weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddad import DDADConfig, DDADWeights, DetectConfig, RuntimeConfig, load_config, train_run  # noqa: E402
from ddad.checkpoint import Checkpoint, atomic_write_text  # noqa: E402
from ddad.data.formats import DataConfig  # noqa: E402
from ddad.data.splits import load_train_images  # noqa: E402
from ddad.diffusion.objective import ddpm_loss  # noqa: E402
from ddad.diffusion.sampler import SamplerConfig  # noqa: E402
from ddad.diffusion.unet import UNet, UNetConfig  # noqa: E402
from ddad.engine.recipe import TrainConfig, make_optimizer  # noqa: E402
from ddad.methods.ddad.loading import with_detection  # noqa: E402
from ddad.methods.ddad.sweep import sweep  # noqa: E402
from ddad.runs import RunDir  # noqa: E402
from ddad.scoring import ScoringConfig  # noqa: E402

MOBILENET = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
RESULTS = Path(__file__).resolve().parent / "results"


def setup(recipe: str, dataset: str, root: str, size: int, batch: int | None) -> DDADConfig:
    channels = 1 if dataset in ("mtd", "kolektorsdd") else 3
    if recipe == "paper":
        model = UNetConfig.ddad_s(size, channels)
        train = TrainConfig.recipe("paper", batch_size=batch or 16)
    else:
        model = UNetConfig.compact(size, channels)
        train = TrainConfig(batch_size=batch or 16)
    weights = str(MOBILENET) if MOBILENET.is_file() else None
    detect = DetectConfig(sampler=SamplerConfig(250, 25, w=3.0, eta=1.0),
                          scoring=ScoringConfig(mode="combined", v=1.0, sigma=size / 64), backbone="mobilenet_v2",
                          crop=1.0)
    data = DataConfig(dataset=dataset, root=root, image_size=size, channels=channels)
    return DDADConfig(data=data, model=model, train=replace(train, epochs=100_000, keep_checkpoints=1,
                                                            checkpoint_every=100_000), detect=detect,
                      weights=DDADWeights(backbone_weights=weights), runtime=RuntimeConfig(batch_size=32))


def seconds_per_step(config: DDADConfig, steps: int = 4) -> float:
    """Wall time of one optimizer step of ``config`` on random data, on all cores (first step excluded)."""
    torch.manual_seed(0)
    model = UNet(config.model)
    opt = make_optimizer(model, config.train, torch.device("cpu"))
    from ddad.diffusion.schedule import alphas_cumprod

    table = alphas_cumprod(config.schedule).float()
    b, c, s = config.train.batch_size, config.model.in_channels, config.model.image_size
    x = torch.rand(b, c, s, s) * 2 - 1
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        t = torch.randint(0, 1000 if config.train.max_timestep is None else config.train.max_timestep + 1, (b,))
        loss = ddpm_loss(model, x, t, torch.randn_like(x), table, config.train.loss_reduction)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def cmd_calibrate(args) -> None:
    out = {}
    for recipe in ("paper", "default"):
        cfg = setup(recipe, args.dataset, "unused", args.image_size, args.batch)
        out[recipe] = seconds_per_step(cfg)
        print(f"{recipe}: {out[recipe]:.3f} s/step ({torch.get_num_threads()} threads)", flush=True)
    path = RESULTS / f"calibration-{args.image_size}.json"
    atomic_write_text(path, json.dumps({"seconds_per_step": out, "threads": torch.get_num_threads(),
                                        "image_size": args.image_size, "date": str(date.today())}, indent=2))
    print(f"wrote {path}")


def parse_changes(pairs: list[str]) -> dict:
    """``["key=value", ...]`` -> {key: YAML value}."""
    import yaml

    return {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in pairs)}


def cmd_train(args) -> None:
    cal = json.loads((RESULTS / f"calibration-{args.image_size}.json").read_text())["seconds_per_step"]
    config = setup(args.recipe, args.dataset, args.data_root, args.image_size, args.batch)
    if args.train_set:  # ablations: one lever changed, e.g. --train-set timestep_weighting=min-snr
        config = config.replace(train=replace(config.train, **parse_changes(args.train_set)))
    seconds_per_step = cal[args.recipe]
    if args.unet:  # ablations: the other recipe's UNet (its step time is that recipe's calibration)
        other = "paper" if args.unet == "ddad-s" else "default"
        config = config.replace(model=setup(other, args.dataset, args.data_root, args.image_size, args.batch).model)
        seconds_per_step = cal[other]
    if args.model_set:
        config = config.replace(model=replace(config.model, **parse_changes(args.model_set)))
    marks = sorted({max(1, round(60 * m / seconds_per_step)) for m in args.minutes})
    config = config.replace(train=replace(config.train, checkpoint_steps=tuple(marks[:-1]), max_steps=marks[-1]))
    run = RunDir(args.run_dir)
    resume = run.latest_checkpoint() is not None
    if resume:  # a larger budget continues the run
        run.save_config(config)
    (run.root).mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.root / "budget.json", json.dumps(
        {"recipe": args.recipe + (f" unet={args.unet}" if args.unet else "")
         + "".join(f" {a}" for a in args.train_set + args.model_set),
         "minutes": sorted(args.minutes), "steps": marks, "seconds_per_step": seconds_per_step},
        indent=2))
    t0 = time.perf_counter()
    result = train_run(config, run.root, resume=resume, progress=not args.quiet)
    print(f"trained to step {result.steps_done} in {time.perf_counter() - t0:.0f} s ({torch.get_num_threads()} threads)")


def row_key(r: dict) -> tuple:
    """What identifies a result row (rows written before w and extractor were recorded had w 3 and the
    pretrained extractor; pixel-only rows use no extractor)."""
    extractor = "-" if r["mode"] == "pixel" else r.get("extractor", "pretrained")
    return (r["checkpoint"], r["weights"], r.get("feature_size"), r.get("w", 3.0), r["mode"], extractor,
            normalization_of(r))


def normalization_of(r: dict) -> str:
    """Eq. 9's maxima of a combined row (rows written before it was recorded: per image); '-' otherwise."""
    return r.get("normalization", "image") if r["mode"] == "combined" else "-"


def cmd_eval(args) -> None:
    run = RunDir(args.run_dir)
    budget = json.loads((run.root / "budget.json").read_text())
    config = load_config(run)
    out_path = run.root / "budget-results.json"
    rows = json.loads(out_path.read_text()) if out_path.is_file() else []
    w = config.detect.sampler.w if args.w is None else args.w
    done = {row_key(r) for r in rows}
    if args.extractor == "adapted":
        from ddad.methods.ddad.adaptation import adapted_checkpoints

        if not adapted_checkpoints(run):
            raise SystemExit(f"{run.root} has no adapted extractor: run `ddad adapt {run.root}` first")
    modes = ["pixel", "combined"] if args.feature_size is None and args.extractor == "pretrained" else ["combined"]
    for _, path in run.checkpoints():
        ckpt = Checkpoint(path)
        step = int(ckpt.info["step"])
        wanted = {row_key({"checkpoint": path.name, "weights": args.weights, "feature_size": args.feature_size,
                           "w": w, "mode": m, "extractor": args.extractor, "normalization": args.normalization})
                  for m in modes}
        if wanted <= done or (args.steps and step not in args.steps):
            continue
        at = with_detection(config, checkpoint=path.name, average=args.weights, w=w,
                            normalization=args.normalization)
        at = at.replace(detect=replace(at.detect, scoring=replace(at.detect.scoring, feature_size=args.feature_size)))
        t0 = time.perf_counter()
        for r in sweep(run, at, [at.detect.sampler.w], [at.detect.scoring.v], modes, [args.extractor],
                       progress=not args.quiet):
            rows.append({"checkpoint": path.name, "step": step, "recipe": budget["recipe"],
                         "minutes": step * budget["seconds_per_step"] / 60, "mode": r["mode"],
                         "weights": args.weights, "feature_size": args.feature_size, "w": w,
                         "extractor": r["extractor"] if r["mode"] != "pixel" else "-",
                         "normalization": args.normalization if r["mode"] == "combined" else "-",
                         "weights_used": args.weights if ckpt.has("ema") else "raw",
                         "image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"], "pro": r["pro"],
                         "eval_s": time.perf_counter() - t0, "date": str(date.today())})
            print(json.dumps(rows[-1]), flush=True)
        # merge with what other processes wrote meanwhile (runs of this script may share a run)
        theirs = json.loads(out_path.read_text()) if out_path.is_file() else []
        merged = {row_key(r): r for r in theirs}
        merged.update({row_key(r): r for r in rows})
        rows = list(merged.values())
        atomic_write_text(out_path, json.dumps(rows, indent=2))


def cmd_patchcore(args) -> None:
    from patchcore import run_patchcore

    from dataclasses import asdict

    from ddad.backbones import create_backbone
    from ddad.data.splits import load_test_split
    from ddad.engine.testing import split_metrics

    config = setup("default", args.dataset, args.data_root, args.image_size, None)
    run = RunDir(Path(args.out).with_suffix(""))
    run.save_config(config)
    split = load_test_split(config.data, progress=False)
    train_images = load_train_images(config.data, progress=False)
    d = config.detect
    extractor = create_backbone(d.backbone, d.scoring.feature_layers, config.weights.backbone_weights)
    rows = []
    for fraction in args.fractions:
        pc = run_patchcore(extractor, train_images, split.images, fraction, d.scoring.sigma, d.crop,
                           d.scoring.feature_layers, args.input_size)
        rows.append({"method": f"PatchCore-{fraction:.0%}", "input_size": args.input_size,
                     **asdict(split_metrics(split, pc.scores.numpy(), pc.maps, d.crop)),
                     "fit_s": pc.fit_seconds, "infer_s_per_image": pc.predict_seconds_per_image,
                     "date": str(date.today())})
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_text(Path(args.out), json.dumps(rows, indent=2))


def cmd_table(args) -> None:
    """Markdown rows: one per run, checkpoint, weights, feature size and scoring mode; PatchCore after."""
    def f(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    print("| recipe | minutes (steps) | weights | w | scoring | Eq. 9 maxima | features | backbone input | image AUROC | "
          "pixel AUROC | PRO |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run_dir in args.runs:
        rows = json.loads((Path(run_dir) / "budget-results.json").read_text())
        for r in sorted(rows, key=lambda r: (r["minutes"], r["weights"], r.get("w", 3.0), r.get("feature_size") or 0,
                                             r["mode"])):
            size = r.get("feature_size") or "image size"
            used = r.get("weights_used") or ("raw" if r["recipe"].startswith("paper") else r["weights"])
            ext = r.get("extractor", "pretrained") if r["mode"] != "pixel" else "-"
            print(f"| {r['recipe']} | {r['minutes']:.1f} ({r['step']}) | {used} | {r.get('w', 3.0):g} | {r['mode']} | "
                  f"{normalization_of(r)} | {ext} | {size if r['mode'] != 'pixel' else '-'} | {f(r['image_auroc'])} | {f(r['pixel_auroc'])} | "
                  f"{f(r['pro'])} |")
    for path in args.patchcore or []:
        for r in json.loads(Path(path).read_text()):
            print(f"| {r['method']} | fit {r['fit_s']:.0f} s | - | - | - | - | pretrained | {r.get('input_size') or 'image size'} | "
                  f"{f(r['image_auroc'])} | {f(r['pixel_auroc'])} | {f(r['pro'])} |")


def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for run_dir in args.runs:
        rows = json.loads((Path(run_dir) / "budget-results.json").read_text())
        for mode, style in (("combined", "-o"), ("pixel", "--s")):
            sel = sorted((r for r in rows if r["mode"] == mode and r["weights"] == "ema" and r.get("w", 3.0) == 3.0
                          and r.get("feature_size") == args.feature_size
                          and normalization_of(r) in (args.normalization, "-")
                          and r.get("extractor", "pretrained") in ("pretrained", "-")), key=lambda r: r["minutes"])
            if not sel:
                continue
            for ax, key in zip(axes, ("image_auroc", "pixel_auroc", "pro")):
                ax.plot([r["minutes"] for r in sel], [r[key] for r in sel], style,
                        label=f"{sel[0]['recipe']} recipe, {mode}")
    if args.patchcore:
        pc = json.loads(Path(args.patchcore).read_text())
        for r, color in zip(pc, ("k", "grey")):
            for ax, key in zip(axes, ("image_auroc", "pixel_auroc", "pro")):
                ax.axhline(r[key], color=color, linestyle=":", label=r["method"])
    for ax, title in zip(axes, ("image AUROC", "pixel AUROC", "PRO")):
        ax.set_title(title)
        ax.set_xlabel("training minutes (2-core CPU)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("calibrate", "train", "patchcore"):
        q = sub.add_parser(name)
        q.add_argument("--dataset", default="mtd")
        q.add_argument("--data-root", default="../shared/data/mtd")
        q.add_argument("--image-size", type=int, default=64)
        q.add_argument("--batch", type=int)
        q.add_argument("--quiet", action="store_true")
    sub.choices["train"].add_argument("--recipe", choices=("paper", "default"), required=True)
    sub.choices["train"].add_argument("--minutes", type=float, nargs="+", required=True)
    sub.choices["train"].add_argument("--run-dir", type=Path, required=True)
    sub.choices["train"].add_argument("--train-set", nargs="+", default=[], metavar="KEY=VALUE",
                                      help="change TrainConfig fields (ablations)")
    sub.choices["train"].add_argument("--unet", choices=("compact", "ddad-s"),
                                      help="the UNet (default: the recipe's: ddad-s for paper, compact for default)")
    sub.choices["train"].add_argument("--model-set", nargs="+", default=[], metavar="KEY=VALUE",
                                      help="change UNetConfig fields (ablations), e.g. dropout=0")
    sub.choices["patchcore"].add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.01])
    sub.choices["patchcore"].add_argument("--out", required=True)
    sub.choices["patchcore"].add_argument("--input-size", type=int, help="backbone input size (as --feature-size)")
    q = sub.add_parser("eval")
    q.add_argument("--run-dir", type=Path, required=True)
    q.add_argument("--steps", type=int, nargs="+", help="only the checkpoints at these optimizer steps")
    q.add_argument("--weights", choices=("ema", "raw"), default="ema")
    q.add_argument("--feature-size", type=int, help="backbone input size for D_f (default: the image size)")
    q.add_argument("--normalization", choices=("positional", "calibrated", "image", "batch"), default="positional",
                   help="where Eq. 9's maxima come from (rows before 2026-11-24: image)")
    q.add_argument("--w", type=float, help="conditioning w (default: the setup's 3)")
    q.add_argument("--extractor", choices=("pretrained", "adapted"), default="pretrained",
                   help="features for D_f: the pretrained backbone or the run's domain-adapted one (ddad adapt)")
    q.add_argument("--quiet", action="store_true")
    q = sub.add_parser("table")
    q.add_argument("runs", nargs="+")
    q.add_argument("--patchcore", nargs="+")
    q = sub.add_parser("plot")
    q.add_argument("runs", nargs="+")
    q.add_argument("--patchcore")
    q.add_argument("--feature-size", type=int, help="plot the rows scored with this backbone input size")
    q.add_argument("--normalization", default="calibrated", help="plot combined rows with these Eq. 9 maxima")
    q.add_argument("--title", default="")
    q.add_argument("--out", required=True)
    args = p.parse_args()
    if getattr(args, "data_root", None) and args.cmd != "calibrate" and not Path(args.data_root).is_dir():
        print(f"skipped: {args.data_root} does not exist")
        return
    {"calibrate": cmd_calibrate, "train": cmd_train, "eval": cmd_eval, "patchcore": cmd_patchcore,
     "table": cmd_table, "plot": cmd_plot}[args.cmd](args)


if __name__ == "__main__":
    main()
