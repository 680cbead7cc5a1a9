"""The ``ddad`` command: synth, train, adapt, test, predict, sweep, presets, import, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .config import ConfigError, RunConfig, merge, parse_assignment
from .data.io import DatasetError

RESUMABLE_TRAIN_FIELDS = ("epochs", "checkpoint_every", "keep_checkpoints", "device", "precision", "max_steps",
                          "max_minutes")


def _add_detect_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detection (defaults: the run's config)")
    g.add_argument("--w", type=float, help="conditioning strength w (Eq. 6)")
    g.add_argument("--v", type=float, help="pixel-vs-feature balance v (Eq. 9)")
    g.add_argument("--eta", type=float, help="stochasticity eta of the DDIM update (Eq. 7)")
    g.add_argument("--start-step", type=int, help="T': the timestep the input is noised to")
    g.add_argument("--skip", type=int, help="timesteps between network calls")
    g.add_argument("--steps", type=int, help="number of network calls (DDAD-n); sets --skip")
    g.add_argument("--scoring", choices=("combined", "pixel", "feature"), help="which distances make the map")
    g.add_argument("--pixel-only", action="store_true", help="same as --scoring pixel (needs no backbone)")
    g.add_argument("--backbone", help="feature extractor (wide_resnet101_2, wide_resnet50_2, resnet18, resnet50, mobilenet_v2)")
    g.add_argument("--backbone-weights", help="weights file or folder; 'random' for random weights")
    g.add_argument("--allow-download", action="store_true", default=None, help="download missing backbone weights")
    g.add_argument("--sigma", type=float, help="Gaussian smoothing of the map")
    g.add_argument("--feature-size", type=int, help="the backbone sees input and reconstruction resized to this size")
    g.add_argument("--crop", type=float, help="centre-crop fraction for evaluation (0.875 = 224/256)")
    g.add_argument("--batch-size", type=int, help="images per batch")
    g.add_argument("--seed", type=int, help="seed of the per-image sampling noise")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (GPU)")
    g.add_argument("--backend", choices=("torch", "onnxruntime"), help="run the networks in PyTorch or ONNX Runtime")
    g.add_argument("--channels-last", action="store_true", default=None, help="NHWC memory layout")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the UNet and the feature extractor")
    g.add_argument("--micro-batch", type=int,
                   help="run the UNet on chunks of this many images (0: whole batch; default: automatic)")
    g.add_argument("--checkpoint", help="which checkpoint of the run (file name in RUN_DIR/checkpoints or a path; "
                                        "default: the latest)")
    g.add_argument("--weights", choices=("ema", "raw"), help="the EMA of the weights (default, where kept) or the raw ones")
    g.add_argument("--force-timestep", action="store_true", default=None,
                   help="allow a T' above the largest timestep the model was trained on")
    g.add_argument("--pretrained", action="store_true", help="score with the pretrained, not the adapted, extractor")
    g.add_argument("--adapted-epoch", type=int, help="score with the adapted extractor of this epoch")
    g.add_argument("--authors-first-step", action="store_true", default=None,
                   help="compatibility: first network call at T'-skip, as the authors' code")
    g.add_argument("--normalization", choices=("positional", "calibrated", "image", "batch"),
                   help="where Eq. 9's maxima come from: defect-free calibration images after dividing by their "
                        "per-pixel mean distances (positional, the default), the same without that division "
                        "(calibrated), each image, or the batch (the authors' code)")
    g.add_argument("--normalize-over-batch", action="store_const", const="batch", dest="normalization",
                   help="same as --normalization batch")


def _detect_from_args(base, args):
    from .diffusion.sampler import skip_for_steps
    from .evaluation import with_overrides

    mode = "pixel" if args.pixel_only else args.scoring
    skip = args.skip
    if args.steps is not None:
        skip = skip_for_steps(args.start_step or base.sampler.start_step, args.steps)
    return with_overrides(
        base, w=args.w, v=args.v, eta=args.eta, start_step=args.start_step, skip=skip, mode=mode,
        backbone=args.backbone, backbone_weights=args.backbone_weights, allow_download=args.allow_download,
        sigma=args.sigma, feature_size=args.feature_size, crop=args.crop, batch_size=args.batch_size,
        seed=args.seed, device=args.device,
        precision=args.precision, authors_first_step=args.authors_first_step,
        normalization=args.normalization, adapted=False if args.pretrained else None,
        adapted_epoch=args.adapted_epoch, backend=args.backend, channels_last=args.channels_last,
        compile=args.compile, micro_batch=args.micro_batch, checkpoint=args.checkpoint, weights=args.weights,
        force_timestep=args.force_timestep,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddad", description="Diffusion-based visual anomaly detection (DDAD).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a small synthetic dataset in the MVTec layout")
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--train", type=int, default=48)
    p.add_argument("--test-good", type=int, default=12)
    p.add_argument("--test-defective", type=int, default=6, help="per defect type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--categories", nargs="+", default=None)

    p = sub.add_parser("train", help="train the denoising UNet on defect-free images")
    p.add_argument("--config", type=Path, help="YAML file with data/model/schedule/train/detect sections")
    p.add_argument("--run-dir", type=Path, help="output folder (default runs/<dataset>-<category>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--dataset", help="dataset format: mvtec, mpdd, visa, mtd, btad, kolektorsdd, folder")
    p.add_argument("--data-root", help="dataset root folder")
    p.add_argument("--category", help="category folder under the root")
    p.add_argument("--normal-dir", help="folder format: defect-free images")
    p.add_argument("--abnormal-dir", help="folder format: defective test images")
    p.add_argument("--mask-dir", help="folder format: masks of the defective images, matched by stem")
    p.add_argument("--normal-test-dir", help="folder format: defect-free test images")
    p.add_argument("--train-ratio", type=float, help="share of defect-free images used for training (seeded split)")
    p.add_argument("--data-seed", type=int, help="seed of the train/test split")
    p.add_argument("--skip-bad-files", action="store_true", default=None,
                   help="skip undecodable images with a warning (counted in the run log)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--channels", type=int, choices=(1, 3))
    p.add_argument("--model", choices=("ddad", "ddad-s", "compact", "tiny"), help="UNet preset")
    p.add_argument("--preset", choices=("mvtec", "mvtec-s", "visa"),
                   help="the paper's settings for --category (Tables 9-11, with --recipe paper); flags still override")
    p.add_argument("--recipe", choices=("default", "paper"),
                   help="training recipe: ddad's default, or the paper's exactly (Sec. 5.2, App. 7)")
    p.add_argument("--minutes", type=float, dest="max_minutes", help="stop (and save) after this much training time")
    p.add_argument("--max-steps", type=int, help="stop (and save) after this many optimizer steps")
    p.add_argument("--max-timestep", type=int, help="train t in [0, N] (default 250: the detector's T'); "
                                                    "-1: the whole schedule")
    p.add_argument("--ema-decay", type=float, help="EMA of the weights for detection (0: none)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints")
    p.add_argument("--device")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any setting, e.g. --set detect.sampler.w=3 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("adapt", help="domain-adapt the feature extractor of a trained run (Eq. 10)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--epochs", type=int, help="adaptation epochs (default: the run's adapt.epochs)")
    p.add_argument("--batch-size", type=int, help="per batch; split into inputs and targets")
    p.add_argument("--lambda-dl", type=float, help="distillation weight (0.1 MVTec, 0.01 VisA)")
    p.add_argument("--w", type=float, help="conditioning w_DA")
    p.add_argument("--start-step", type=int, help="T'_DA")
    p.add_argument("--lr", type=float)
    p.add_argument("--batchnorm", choices=("frozen", "train"),
                   help="BatchNorm running statistics: frozen at ImageNet's (default) or following the training "
                        "images (the authors' code; --recipe paper runs)")
    p.add_argument("--fresh", action="store_true", help="discard earlier adaptation epochs and start again")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("sweep", help="metrics over w, v, scoring mode and extractor; diffusion once per w")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--ws", type=float, nargs="+", help="conditioning values (default: the run's w)")
    p.add_argument("--vs", type=float, nargs="+", default=[1.0], help="pixel weights v for combined scoring")
    p.add_argument("--modes", nargs="+", default=["pixel", "feature", "combined"],
                   choices=("pixel", "feature", "combined"))
    p.add_argument("--extractors", nargs="+", default=["pretrained", "adapted"], choices=("pretrained", "adapted"))
    p.add_argument("--out", type=Path, help="CSV (default RUN_DIR/sweep.csv)")
    p.add_argument("--quiet", action="store_true")
    _add_detect_flags(p)

    p = sub.add_parser("export", help="write the UNet step and the feature extractor as ONNX graphs")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--out", type=Path, help="folder (default RUN_DIR/export; predict --backend onnxruntime reads it)")
    _add_detect_flags(p)

    p = sub.add_parser("presets", help="print the paper's per-category settings (Tables 9-11)")
    p.add_argument("preset", nargs="?", choices=("mvtec", "mvtec-s", "visa"))

    p = sub.add_parser("import", help="make a run directory from one of the authors' published UNet checkpoints")
    p.add_argument("checkpoint", type=Path, help="the authors' checkpoint file (torch.save of a state_dict)")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--model", choices=("ddad", "ddad-s"), default="ddad")
    p.add_argument("--dataset", default="mvtec")
    p.add_argument("--data-root", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--epoch", type=int, default=0, help="the epoch the checkpoint was saved at (for the record)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")

    p = sub.add_parser("test", help="evaluate a trained run on its test split")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/test)")
    p.add_argument("--no-images", action="store_true", help="skip the per-image PNGs")
    p.add_argument("--report", action="store_true", help="also write the HTML report (RUN_DIR/report)")
    p.add_argument("--quiet", action="store_true")
    _add_detect_flags(p)

    p = sub.add_parser("report", help="a self-contained HTML report of the last ddad test")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--test-dir", type=Path, help="ddad test output (default RUN_DIR/test)")
    p.add_argument("--out", type=Path, help="folder (default RUN_DIR/report)")

    p = sub.add_parser("predict", help="score new images (files or folders) without labels")
    p.add_argument("run_dir", type=Path)
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threshold", type=float, help="decision threshold (default: the one stored by ddad test)")
    p.add_argument("--no-images", action="store_true")
    p.add_argument("--quiet", action="store_true")
    _add_detect_flags(p)

    p = sub.add_parser("demo", help="synthetic data -> train -> test, on the CPU in a few minutes")
    p.add_argument("out", type=Path, nargs="?", default=Path("ddad-demo"))
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--category", default="washer")
    p.add_argument("--quiet", action="store_true")
    return parser


def _train_config(args) -> tuple[RunConfig, Path]:
    from .diffusion.unet import UNetConfig
    from .runs import RunDir

    if args.resume:
        if args.run_dir is None:
            raise ConfigError("--resume needs --run-dir (the run to continue)")
        config = RunDir(args.run_dir).load_config()
        train_over = {k: getattr(args, k) for k in RESUMABLE_TRAIN_FIELDS if getattr(args, k, None) is not None}
        blocked = [flag for flag in ("config", "dataset", "data_root", "category", "image_size", "channels", "model",
                                     "batch_size", "lr", "weight_decay", "seed", "recipe", "max_timestep",
                                     "ema_decay", "normal_dir", "abnormal_dir",
                                     "mask_dir", "normal_test_dir", "train_ratio", "data_seed", "skip_bad_files")
                   if getattr(args, flag) is not None]
        if blocked or args.set:
            raise ConfigError(f"--resume continues a run with its stored settings; only "
                              f"{', '.join(RESUMABLE_TRAIN_FIELDS)} may change (got {', '.join(blocked + args.set)})")
        data = config.to_dict()
        data["train"].update(train_over)
        return RunConfig.from_dict(data), args.run_dir

    data = RunConfig().with_recipe(args.recipe or ("paper" if args.preset else "default")).to_dict()
    if args.preset:
        from .presets import get_setting

        if not args.category:
            raise ConfigError("--preset needs --category (ddad presets lists them)")
        setting = get_setting(args.preset, args.category)
        data = merge(data, setting.overrides())
        data["model"] = UNetConfig.preset(setting.model, 256, 3).to_dict()
    if args.config:
        data = merge(data, RunConfig.from_yaml(args.config).to_dict())
    flags = {
        "data": {"dataset": args.dataset, "root": args.data_root, "category": args.category,
                 "image_size": args.image_size, "channels": args.channels, "normal_dir": args.normal_dir,
                 "abnormal_dir": args.abnormal_dir, "mask_dir": args.mask_dir,
                 "normal_test_dir": args.normal_test_dir, "train_ratio": args.train_ratio,
                 "seed": args.data_seed, "skip_bad_files": args.skip_bad_files},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "weight_decay": args.weight_decay, "seed": args.seed, "checkpoint_every": args.checkpoint_every,
                  "device": args.device, "precision": args.precision, "max_minutes": args.max_minutes,
                  "max_steps": args.max_steps, "ema_decay": args.ema_decay},
    }
    for section, values in flags.items():
        data[section].update({k: v for k, v in values.items() if v is not None})
    if args.max_timestep is not None:
        data["train"]["max_timestep"] = None if args.max_timestep < 0 else args.max_timestep
    for assignment in args.set:
        data = merge(data, parse_assignment(assignment))
    size, channels = data["data"]["image_size"], data["data"]["channels"]
    if args.model:
        data["model"] = UNetConfig.preset(args.model, size, channels).to_dict()
    data["model"].update({"image_size": size, "in_channels": channels})
    config = RunConfig.from_dict(data)
    if not config.data.root and not config.data.normal_dir:
        raise ConfigError("no dataset: pass --data-root (and --category), --normal-dir for the folder format, "
                          "or a --config with a data section")
    run_dir = args.run_dir or Path("runs") / f"{config.data.dataset}-{config.data.category or 'data'}"
    return config, run_dir


def cmd_train(args) -> int:
    from .api import train_run

    config, run_dir = _train_config(args)
    result = train_run(config, run_dir, resume=args.resume, progress=not args.quiet)
    print(f"trained {result.epochs_done} epochs; last loss {result.last_loss:.4g}; "
          f"{result.images_per_second:.1f} img/s\ncheckpoint: {result.checkpoint}\nrun: {run_dir}")
    return 0


def cmd_import(args) -> int:
    from .api import import_official

    data = {"data": {"dataset": args.dataset, "root": args.data_root, "category": args.category,
                     "image_size": args.image_size, "channels": args.channels}}
    for assignment in args.set:
        data = merge(data, parse_assignment(assignment))
    config = RunConfig.from_dict(merge(RunConfig().to_dict(), data))
    path = import_official(args.checkpoint, args.run_dir, config, preset=args.model, epoch=args.epoch)
    print(f"imported {args.checkpoint} as {path}\nrun: {args.run_dir}  (next: ddad test {args.run_dir})")
    return 0


def cmd_adapt(args) -> int:
    import shutil

    from .adaptation import adapted_dir
    from .api import adapt_run
    from .runs import RunDir

    run = RunDir(args.run_dir).require()
    if args.fresh and adapted_dir(run).is_dir():
        shutil.rmtree(adapted_dir(run))
    records = adapt_run(run.root, {"epochs": args.epochs, "batch_size": args.batch_size, "lambda_dl": args.lambda_dl,
                                   "w": args.w, "start_step": args.start_step, "lr": args.lr,
                                   "train_batchnorm": None if args.batchnorm is None else args.batchnorm == "train"},
                        progress=not args.quiet)
    for r in records:
        print("epoch {epoch}: loss {total:.5f} (similarity {similarity:.5f}, distill y {distill_target:.5f}, "
              "distill x0 {distill_recon:.5f})".format(**r))
    print(f"adapted extractor: {adapted_dir(run)}  (ddad test uses the last epoch; --pretrained to compare)")
    return 0


def cmd_sweep(args) -> int:
    from .evaluation import sweep, write_csv
    from .runs import RunDir

    run = RunDir(args.run_dir).require()
    detect = _detect_from_args(run.load_config().detect, args)
    rows = sweep(run, args.ws or [detect.sampler.w], args.vs, args.modes, args.extractors, detect,
                 progress=not args.quiet)
    out = args.out or run.root / "sweep.csv"
    write_csv(out, list(rows[0]), [[r[k] for k in rows[0]] for r in rows])

    def f(v):
        return "n/a" if v is None else f"{v:.4f}"

    print(f"{'w':>5} {'mode':<9} {'v':>5} {'extractor':<10} {'image AUROC':>11} {'pixel AUROC':>11} {'PRO':>7}")
    for r in rows:
        v = "-" if r["v"] is None else f"{r['v']:g}"
        print(f"{r['w']:>5g} {r['mode']:<9} {v:>5} {r['extractor']:<10} {f(r['image_auroc']):>11} "
              f"{f(r['pixel_auroc']):>11} {f(r['pro']):>7}")
    print(f"table: {out}")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx
    from .runs import RunDir

    run = RunDir(args.run_dir).require()
    detect = _detect_from_args(run.load_config().detect, args)
    out = export_onnx(run, args.out, detect)
    print(f"exported to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def cmd_presets(args) -> int:
    from .presets import format_table

    print(format_table(args.preset))
    return 0


def cmd_test(args) -> int:
    from .evaluation import test_run
    from .runs import RunDir

    run = RunDir(args.run_dir).require()
    detect = _detect_from_args(run.load_config().detect, args)
    metrics = test_run(run, detect, args.out, save_images=not args.no_images, progress=not args.quiet)
    out = args.out or run.test_dir
    print(format_metrics(metrics))
    print(f"metrics: {out / 'metrics.json'}\nscores:  {out / 'scores.csv'}"
          + ("" if args.no_images else f"\nimages:  {out / 'images'}"))
    if args.report:
        from .report import write_report

        print(f"report:  {write_report(run, out)}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    from .runs import RunDir

    print(f"report: {write_report(RunDir(args.run_dir).require(), args.test_dir, args.out)}")
    return 0


def format_metrics(metrics: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"

    return (f"{metrics['dataset']}: image AUROC {f(metrics['image_auroc'])}  pixel AUROC {f(metrics['pixel_auroc'])}"
            f"  PRO {f(metrics['pro'])}  ({metrics['n_images']} images, {metrics['n_defective']} defective)")


def cmd_predict(args) -> int:
    from .evaluation import predict
    from .runs import RunDir

    run = RunDir(args.run_dir).require()
    detect = _detect_from_args(run.load_config().detect, args)
    rows = predict(run, args.paths, args.out, args.threshold, detect, save_images=not args.no_images,
                   progress=not args.quiet)
    flagged = sum(r["decision"] == "defective" for r in rows)
    decided = rows and rows[0]["decision"] is not None
    print(f"scored {len(rows)} images" + (f"; {flagged} flagged defective" if decided else
                                          " (no threshold: run ddad test or pass --threshold)"))
    print(f"scores: {args.out / 'scores.csv'}")
    return 0


def cmd_synth(args) -> int:
    from .data.synth import CATEGORIES, SynthConfig, generate

    cfg = SynthConfig(size=args.size, train=args.train, test_good=args.test_good,
                      test_defective_per_type=args.test_defective, seed=args.seed,
                      categories=tuple(args.categories or CATEGORIES))
    for folder in generate(args.out, cfg):
        print(f"wrote {folder}")
    return 0


def cmd_demo(args) -> int:
    from .api import demo

    metrics, run_dir = demo(args.out, epochs=args.epochs, category=args.category, progress=not args.quiet)
    print(format_metrics(metrics))
    print(f"run:     {run_dir}\nmetrics: {run_dir / 'test' / 'metrics.json'}\nimages:  {run_dir / 'test' / 'images'}"
          f"\nreport:  {run_dir / 'report' / 'index.html'}")
    return 0


COMMANDS = {"synth": cmd_synth, "train": cmd_train, "adapt": cmd_adapt, "sweep": cmd_sweep,
            "presets": cmd_presets, "export": cmd_export, "report": cmd_report, "import": cmd_import, "test": cmd_test, "predict": cmd_predict, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DatasetError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"ddad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
