"""Detection quality on real data: ddad variants and PatchCore, side by side, with stage timings.

    python benchmarks/quality.py --dataset mtd --data-root ../shared/data/mtd --profile cpu --run-dir runs/q-mtd
    python benchmarks/quality.py --dataset kolektorsdd --data-root ../shared/data/kolektorsdd --profile cpu
    python benchmarks/quality.py --dataset mvtec --data-root MVTec --category bottle --profile paper

Stages: train the denoiser (resumed if the run exists), evaluate pixel-only / feature-only / combined
with the pretrained extractor (the diffusion runs once; the rest rescore cached reconstructions),
domain-adapt the extractor and evaluate feature-only / combined again (the paper's Fig. 4 ablation),
then PatchCore with the same backbone, image size, split, smoothing and metrics code.
Prints a Markdown table and writes RUN_DIR/quality.json.

Profiles (with --recipe default, ddad's training recipe, or --recipe paper; --minutes caps training time)
  cpu:   64 x 64, --recipe paper: DDAD-S UNet (the paper's small model); --recipe default: the compact
         UNet; --epochs (default 8), batch 16, mobilenet_v2
         (real ImageNet weights), T' 250, skip 25, eta 1, w 3, v 1, Gaussian sigma 1 (4 scaled to 64 px),
         no crop, 2 adaptation epochs (lambda 0.1). Fits in under an hour per dataset on 2 CPU cores.
  paper: 256 x 256, DDAD UNet, the paper's settings (wide_resnet101_2, sigma 4, crop 224); for a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from patchcore import run_patchcore  # noqa: E402

from ddad import (AdaptConfig, DDADConfig, DDADWeights, DetectConfig, RuntimeConfig, adapt_run,  # noqa: E402
                  load_config, test_run, train_run, with_detection)
from ddad.backbones import create_backbone  # noqa: E402
from ddad.data.formats import DataConfig, build_index  # noqa: E402
from ddad.data.splits import load_test_split, load_train_images  # noqa: E402
from ddad.diffusion.sampler import SamplerConfig  # noqa: E402
from ddad.diffusion.unet import UNetConfig  # noqa: E402
from ddad.engine.recipe import TrainConfig  # noqa: E402
from ddad.engine.testing import split_metrics  # noqa: E402
from ddad.methods.ddad.extractors import adapted_checkpoints  # noqa: E402
from ddad.methods.ddad.sweep import sweep  # noqa: E402
from ddad.runs import RunDir  # noqa: E402
from ddad.scoring import ScoringConfig  # noqa: E402

MOBILENET = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"


def profile_config(args) -> DDADConfig:
    grey = args.dataset in ("mtd", "kolektorsdd")
    channels = 1 if grey else 3
    data = DataConfig(dataset=args.dataset, root=args.data_root, category=args.category or "",
                      image_size=64 if args.profile == "cpu" else 256, channels=channels)
    if args.profile == "cpu":
        weights = args.backbone_weights or (str(MOBILENET) if MOBILENET.is_file() else None)
        model = UNetConfig.ddad_s(64, channels) if args.recipe == "paper" else UNetConfig.compact(64, channels)
        return DDADConfig(
            data=data, model=model,
            train=TrainConfig.recipe(args.recipe, epochs=args.epochs or 8, batch_size=16, checkpoint_every=1,
                                     max_minutes=args.minutes),
            detect=DetectConfig(sampler=SamplerConfig(250, 25, w=3.0, eta=1.0),
                                scoring=ScoringConfig(mode="combined", v=1.0, sigma=1.0), backbone="mobilenet_v2",
                                crop=1.0),
            weights=DDADWeights(backbone_weights=weights), runtime=RuntimeConfig(batch_size=32),
            adapt=AdaptConfig(epochs=args.adapt_epochs, batch_size=16, lambda_dl=0.1),
        )
    return DDADConfig(
        data=data, model=UNetConfig.ddad(256, channels),
        train=TrainConfig.recipe(args.recipe, epochs=args.epochs or 1000, batch_size=32, checkpoint_every=50,
                                 max_minutes=args.minutes),
        weights=DDADWeights(backbone_weights=args.backbone_weights), runtime=RuntimeConfig(batch_size=16),
        adapt=AdaptConfig(epochs=args.adapt_epochs, batch_size=16, lambda_dl=0.1),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--category", default="")
    p.add_argument("--profile", choices=("cpu", "paper"), default="cpu")
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--epochs", type=int, help="denoiser training epochs (profile default otherwise)")
    p.add_argument("--recipe", choices=("default", "paper"), default="default", help="training recipe")
    p.add_argument("--minutes", type=float, help="training time budget (stops early, resumable)")
    p.add_argument("--adapt-epochs", type=int, default=2)
    p.add_argument("--backbone-weights", help="backbone weights file (default: the profile's)")
    p.add_argument("--patchcore-fraction", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if not Path(args.data_root).is_dir():
        print(f"skipped: {args.data_root} does not exist")
        return
    config = profile_config(args)
    run = RunDir(args.run_dir or Path("runs") / f"quality-{args.dataset}-{args.category or 'all'}-{args.profile}")
    timings: dict[str, float] = {}
    progress = not args.quiet

    # 1. the denoiser
    t0 = time.perf_counter()
    resume = run.latest_checkpoint() is not None
    if resume:
        stored = load_config(run)
        config = replace(stored, train=replace(stored.train, epochs=config.train.epochs))
    done = max((e for e, _ in run.checkpoints()), default=0)
    if done < config.train.epochs:
        train_run(config, run.root, resume=resume, progress=progress)
        timings["train_s"] = time.perf_counter() - t0
    config = load_config(run)
    n_train = len(build_index(config.data).train)
    detect = config.detect

    # 2. pretrained extractor: pixel, feature, combined (one diffusion pass, timed as inference)
    import shutil

    shutil.rmtree(run.root / "cache", ignore_errors=True)  # time a real diffusion pass, then keep its result
    t0 = time.perf_counter()
    full = test_run(run, with_detection(config, adapted=False), out_dir=run.root / "test-pretrained",
                    save_images=False, progress=progress, cache=True)
    timings["ddad_infer_s_per_image"] = (time.perf_counter() - t0) / full.overall.n_images
    rows = sweep(run, config, [detect.sampler.w], [detect.scoring.v], ["pixel", "feature", "combined"],
                 ["pretrained"], progress=progress)

    # 3. domain adaptation, then feature / combined with the adapted extractor
    if args.adapt_epochs > 0:
        t0 = time.perf_counter()
        if max((e for e, _ in adapted_checkpoints(run)), default=0) < args.adapt_epochs:
            adapt_run(run.root, {"epochs": args.adapt_epochs}, progress=progress)
        timings["adapt_s"] = time.perf_counter() - t0
        rows += sweep(run, with_detection(config, adapted_epoch=args.adapt_epochs), [detect.sampler.w],
                      [detect.scoring.v], ["feature", "combined"], ["adapted"], progress=progress)

    # 4. PatchCore on the same split, backbone, size, smoothing and metrics
    split = load_test_split(config.data, progress, run.log)
    train_images = load_train_images(config.data, progress=False)
    extractor = create_backbone(detect.backbone, detect.scoring.feature_layers, config.weights.backbone_weights)
    for fraction in args.patchcore_fraction:
        pc = run_patchcore(extractor, train_images, split.images, fraction, detect.scoring.sigma, detect.crop,
                           detect.scoring.feature_layers)
        rows.append({"w": None, "mode": f"PatchCore-{fraction:.0%}", "v": None, "extractor": "pretrained",
                     **asdict(split_metrics(split, pc.scores.numpy(), pc.maps, detect.crop)),
                     "fit_s": pc.fit_seconds, "infer_s_per_image": pc.predict_seconds_per_image})

    def f(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    trained = max((e for e, _ in run.checkpoints()), default=0)
    print(f"\n{config.data.dataset} ({args.profile} profile, {config.data.image_size}px, {n_train} train images, "
          f"{trained} epochs trained; {date.today()})")
    print("| method | extractor | image AUROC | pixel AUROC | PRO |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        name = r["mode"] if r["mode"].startswith("PatchCore") else f"ddad {r['mode']}"
        print(f"| {name} | {r['extractor']} | {f(r['image_auroc'])} | {f(r['pixel_auroc'])} | {f(r['pro'])} |")
    print(json.dumps(timings))
    out = {"rows": rows, "timings": timings, "args": vars(args), "config": config.to_dict(), "epochs_trained": trained,
           "date": str(date.today()), "threads": torch.get_num_threads()}
    (run.root / "quality.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
