"""The ``ddad`` command's arguments: one subcommand each, and the detection flags the run commands share."""

from __future__ import annotations

import argparse
import functools
from importlib.metadata import version
from pathlib import Path

from ..backbones import BACKBONES
from ..data.formats import FORMATS, DataConfig
from ..engine.recipe import TrainConfig
from ..methods import METHODS

# Detection flags whose name is not the setting's: flag dest -> setting name.
DETECT_RENAMES = {"scoring": "mode", "weights": "average"}
DETECT_FLAG_DESTS: list[str] = []  # filled by _add_detect_flags: every detection flag's dest


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_false_alarm_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--max-false-alarms", type=float, metavar="RATE",
                   help=f"{what} for at most this false-alarm rate on the good validation images "
                        "(default: F1-optimal on real validation defects, else 0.01)")


def _add_detect_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detection (defaults: the run's config)")
    first = len(g._group_actions)
    g.add_argument("--w", type=float, help="conditioning strength w (Eq. 6)")
    g.add_argument("--v", type=float, help="pixel-vs-feature balance v (Eq. 9)")
    g.add_argument("--eta", type=float, help="stochasticity eta of the DDIM update (Eq. 7)")
    g.add_argument("--start-step", type=int, help="T': the timestep the input is noised to")
    g.add_argument("--skip", type=int, help="timesteps between network calls")
    g.add_argument("--steps", type=int, help="number of network calls (DDAD-n); sets --skip")
    g.add_argument("--scoring", choices=("combined", "pixel", "feature"), help="which distances make the map")
    g.add_argument("--pixel-only", action="store_true", help="same as --scoring pixel (needs no backbone)")
    g.add_argument("--backbone", help=f"feature extractor ({', '.join(BACKBONES)})")
    g.add_argument("--backbone-weights", help="weights file or folder; 'random' for random weights")
    g.add_argument("--allow-download", action="store_true", default=None, help="download missing backbone weights")
    g.add_argument("--sigma", type=float, help="Gaussian smoothing of the map")
    g.add_argument("--feature-size", type=int, help="the backbone sees input and reconstruction resized to this size")
    g.add_argument("--crop", type=float, help="centre-crop fraction for evaluation (0.875 = 224/256)")
    g.add_argument("--batch-size", type=int, help="images per batch")
    g.add_argument("--seed", type=int, help="seed of the per-image sampling noise")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (GPU)")
    g.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"),
                   help="run the networks in PyTorch or ONNX Runtime; an exported folder (predict) in ONNX Runtime "
                        "or OpenVINO")
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
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="detect_set",
                   help="any detection setting of the run (sections detect, weights, runtime), e.g. "
                        "--set detect.alpha=0.5 for drdc; repeatable")
    if not DETECT_FLAG_DESTS:
        DETECT_FLAG_DESTS.extend(dict.fromkeys(a.dest for a in g._group_actions[first:]))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has a real one (not for flags whose default comes from the config)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddad", description="Diffusion-based visual anomaly detection (DDAD).")
    parser.add_argument("--version", action="version", version=f"ddad {version('ddad')}")
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=HelpFormatter)

    p = add("synth", help="write a small synthetic dataset in the MVTec layout")
    p.add_argument("out", type=Path, help="folder to write (ROOT/CATEGORY/train, test, ground_truth)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--train", type=int, default=48, help="defect-free training images per category")
    p.add_argument("--test-good", type=int, default=12, help="defect-free test images per category")
    p.add_argument("--test-defective", type=int, default=6, help="defective test images per defect type")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")
    p.add_argument("--categories", nargs="+", default=None, help="which categories (default: all: stripes, washer)")

    p = add("combine", help="several datasets of different layouts as one MVTec-layout root (links), for one "
                            "model of all their categories")
    p.add_argument("out", type=Path, help="folder to write (OUT/CATEGORY/train, test, ground_truth)")
    p.add_argument("sources", nargs="+", metavar="[NAME=]FORMAT:ROOT[:CATEGORY]",
                   help="e.g. mtd=mtd:data/mtd kolektorsdd=kolektorsdd:data/kolektorsdd mpdd:data/mpdd:metal_plate "
                        "mvtec:data/deeppcb (CATEGORY for formats with categories: one, a,b,c or all, the default)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of each source's train/test split")

    p = add("train", help="train the denoising UNet on defect-free images")
    p.add_argument("--method", choices=sorted(METHODS),
                   help="ddad: one diffusion model per category (default); drdc: one model for all the categories "
                        "of --category (feature reconstruction refined by diffusion); patchcore: memory banks of "
                        "patch features, no training (one per category, or one for all)")
    p.add_argument("--config", type=Path, help="YAML file with data/model/schedule/train/detect sections; it "
                                               "overrides the recipe and preset, flags and --set override it")
    p.add_argument("--run-dir", type=Path, help="output folder (default runs/<dataset>-<category>, or "
                                                "runs/folder-<normal-dir's name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--dataset", help=f"dataset format: {', '.join(sorted(FORMATS))} (default {DataConfig.dataset})")
    p.add_argument("--data-root", help="dataset root folder")
    p.add_argument("--category", help="category folder under the root; a,b,c or 'all' for several (ddad trains "
                                      "one run per category under --run-dir; drdc one model for all of them; "
                                      "patchcore one bank per category in one run)")
    p.add_argument("--normal-dir", help="folder format: defect-free images")
    p.add_argument("--abnormal-dir", help="folder format: defective test images")
    p.add_argument("--mask-dir", help="folder format: masks of the defective images, matched by stem")
    p.add_argument("--normal-test-dir", help="folder format: defect-free test images")
    p.add_argument("--train-ratio", type=float, help="share of defect-free images used for training (seeded "
                                                     f"split; default {DataConfig.train_ratio})")
    p.add_argument("--val-ratio", type=float, help="share of the defect-free training images held out (seeded, "
                                                   "per category) to choose thresholds on, never trained on "
                                                   f"(default {DataConfig.val_ratio}; 0: none)")
    p.add_argument("--val-abnormal-dir", help="your own defective validation images (thresholds are then F1-optimal "
                                              "on them instead of on synthetic anomalies)")
    p.add_argument("--val-mask-dir", help="masks of --val-abnormal-dir, matched by stem")
    p.add_argument("--data-seed", type=int, help=f"seed of the train/test split (default {DataConfig.seed})")
    p.add_argument("--skip-bad-files", action="store_true", default=None,
                   help="skip undecodable images with a warning (counted in the run log); without it, every "
                        "image of every split is checked before training and a bad one stops it")
    p.add_argument("--image-size", type=int, help=f"images are resized to this square size (default "
                                                  f"{DataConfig.image_size})")
    p.add_argument("--channels", type=int, choices=(1, 3), help=f"grey or colour (default {DataConfig.channels})")
    p.add_argument("--model", choices=("ddad", "ddad-s", "compact", "tiny"),
                   help="UNet preset (default: compact below 128 px on a CPU, else ddad)")
    p.add_argument("--backbone", help=f"feature extractor of the detection, stored with the run ({', '.join(BACKBONES)}; "
                                      "default: wide_resnet101_2 where its weights are here, else one whose "
                                      "weights are, else pixel-only scoring)")
    p.add_argument("--backbone-weights", help="the backbone's weights file or folder")
    p.add_argument("--preset", choices=("mvtec", "mvtec-s", "visa"),
                   help="the paper's settings for --category (Tables 9-11, with --recipe paper); flags still override")
    p.add_argument("--recipe", choices=("default", "paper"),
                   help="training recipe: ddad's default, or the paper's exactly (Sec. 5.2, App. 7); default: "
                        "default, or paper with --preset")
    p.add_argument("--minutes", type=float, dest="max_minutes", help="stop (and save) after this much training time (drdc: for each of its "
                        "two models; --set refine_train.max_minutes=M sets the refiner's alone)")
    p.add_argument("--max-steps", type=int, help="stop (and save) after this many optimizer steps (drdc: for each of its "
                        "two models)")
    p.add_argument("--max-timestep", type=int, help="train t in [0, N] (default 250: the detector's T'); "
                                                    "-1: the whole schedule")
    p.add_argument("--ema-decay", type=float, help=f"EMA of the weights for detection (0: none; default "
                                                   f"{TrainConfig.ema_decay})")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {TrainConfig.epochs})")
    p.add_argument("--batch-size", type=int, help=f"images per optimizer step (default {TrainConfig.batch_size})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {TrainConfig.lr})")
    p.add_argument("--weight-decay", type=float, help=f"weight decay (default {TrainConfig.weight_decay})")
    p.add_argument("--seed", type=int, help=f"seed of the initial weights and the data order (default "
                                            f"{TrainConfig.seed})")
    p.add_argument("--checkpoint-every", type=int, help=f"epochs between checkpoints (default "
                                                        f"{TrainConfig.checkpoint_every})")
    p.add_argument("--checkpoint-minutes", type=float, help="also save after this much training time since the "
                                                            f"last save (default {TrainConfig.checkpoint_minutes})")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (default fp32)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any setting, e.g. --set detect.sampler.w=3 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("adapt", help="domain-adapt the feature extractor of a trained run (Eq. 10)")
    p.add_argument("run_dir", type=Path, help="the run directory (written by ddad train)")
    p.add_argument("--epochs", type=int, help="adaptation epochs (default: the run's adapt.epochs)")
    p.add_argument("--batch-size", type=int, help="per batch; split into inputs and targets")
    p.add_argument("--lambda-dl", type=float, help="distillation weight (0.1 MVTec, 0.01 VisA)")
    p.add_argument("--w", type=float, help="conditioning w_DA")
    p.add_argument("--start-step", type=int, help="T'_DA")
    p.add_argument("--lr", type=float, help="learning rate of the adaptation (default: the run's adapt.lr)")
    p.add_argument("--batchnorm", choices=("frozen", "train"),
                   help="BatchNorm running statistics: frozen at ImageNet's (default) or following the training "
                        "images (the authors' code; --recipe paper runs)")
    p.add_argument("--fresh", action="store_true", help="discard earlier adaptation epochs and start again")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("sweep", help="metrics over w, v, scoring mode and extractor; diffusion once per w")
    p.add_argument("run_dir", type=Path, help="the run directory (written by ddad train)")
    p.add_argument("--ws", type=float, nargs="+", help="conditioning values (default: the run's w)")
    p.add_argument("--vs", type=float, nargs="+", default=[1.0], help="pixel weights v for combined scoring")
    p.add_argument("--modes", nargs="+", default=["pixel", "feature", "combined"],
                   choices=("pixel", "feature", "combined"), help="scoring modes to evaluate")
    p.add_argument("--extractors", nargs="+", default=["pretrained", "adapted"], choices=("pretrained", "adapted"),
                   help="feature extractors to evaluate (adapted: where the run has one)")
    p.add_argument("--out", type=Path, help="CSV (default RUN_DIR/sweep.csv)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_detect_flags(p)

    p = add("export", help="write a self-contained model (graphs, settings, thresholds) for ddad-infer")
    p.add_argument("run_dir", type=Path, help="the run directory (written by ddad train)")
    p.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                   help="graph format: ONNX (ONNX Runtime) or OpenVINO IR (ddad-infer runs either)")
    p.add_argument("--int8", nargs="?", const="auto", choices=("auto", "full", "weights"), metavar="STRATEGY",
                   help="also INT8 graphs (NNCF, calibrated on training images; with --format openvino; ddad-infer "
                        "--int8 runs them): auto (default: weights and activations, falling back to weights only "
                        "per graph where the maps move by more than 2 %% of their range), full, or weights")
    p.add_argument("--out", type=Path, help="folder (default RUN_DIR/export; predict --backend onnxruntime reads it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_detect_flags(p)

    p = add("presets", help="print the paper's per-category settings (Tables 9-11)")
    p.add_argument("preset", nargs="?", choices=("mvtec", "mvtec-s", "visa"), help="one table (default: all)")

    p = add("import", help="make a run directory from one of the authors' published UNet checkpoints")
    p.add_argument("checkpoint", type=Path, help="the authors' checkpoint file (torch.save of a state_dict)")
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory to create")
    p.add_argument("--model", choices=("ddad", "ddad-s"), default="ddad", help="the checkpoint's UNet")
    p.add_argument("--dataset", default="mvtec", help="dataset format of the test data")
    p.add_argument("--data-root", required=True, help="dataset root folder")
    p.add_argument("--category", required=True, help="category folder under the root")
    p.add_argument("--image-size", type=int, default=256, help="the size the checkpoint was trained at")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="grey or colour")
    p.add_argument("--epoch", type=int, default=0, help="the epoch the checkpoint was saved at (for the record)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any setting, e.g. --set detect.sampler.w=3 (repeatable)")

    p = add("test", help="evaluate a trained run on its test split")
    p.add_argument("run_dir", type=Path, help="the run directory (written by ddad train)")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/test)")
    p.add_argument("--no-images", action="store_true", help="skip the per-image PNGs")
    p.add_argument("--report", action="store_true", help="also write the HTML report (RUN_DIR/report)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_false_alarm_flag(p, "choose the threshold")
    _add_detect_flags(p)

    p = add("tune", help="choose detection settings on the run's validation split (never the test split) "
                         "and store them in its config.yaml, and their threshold")
    p.add_argument("run_dir", type=Path, help="the run directory (written by ddad train with a validation split)")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                   help="values to try for a detection setting (repeatable); default for ddad: mode, w, v and "
                        "feature_size (the backbone's input size); for drdc: alpha, start_step")
    p.add_argument("--defect-seeds", type=_int_list, default=None, metavar="S1,S2",
                   help="seeds of the synthetic validation defects (without real ones): a candidate replaces the "
                        "current settings only where its mean gain over these seeds beats its standard error "
                        "(default 0,1,2, and more where the held-out images are too few for 64 defects)")
    p.add_argument("--defect-kinds", type=_str_list, default=None, metavar="K1,K2",
                   help="kinds of synthetic defect to mix (default every kind: perlin, paste, patch, scratch, "
                        "scar, warp, blob, colour)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_false_alarm_flag(p, "then store the chosen settings' threshold")

    p = add("report", help="a self-contained HTML report of the last ddad test")
    p.add_argument("run_dir", type=Path, help="the run directory (written by ddad train)")
    p.add_argument("--test-dir", type=Path, help="ddad test output (default RUN_DIR/test)")
    p.add_argument("--out", type=Path, help="folder (default RUN_DIR/report)")

    p = add("predict", help="score new images (files or folders) without labels")
    p.add_argument("run_dir", type=Path, help="the run directory (written by ddad train), or a folder written by "
                                              "ddad export (then scored by ddad-infer's runtime: --backend, --int8, "
                                              "--category, --masks)")
    p.add_argument("paths", nargs="+", type=Path, help="image files or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output folder: scores.csv and images/ (the panels "
                                                           "of an earlier predict there are replaced)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out files in the folders whose name or relative path matches (repeatable); the "
                        "masks of the run's dataset format are always left out")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the one stored by ddad test)")
    p.add_argument("--category", dest="image_category", metavar="CATEGORY",
                   help="a model of several categories: score and decide every image as this category (default: "
                        "a folder of the image's path named like a category, else the category recognised from the "
                        "image)")
    p.add_argument("--masks", action="store_true", help="also write OUT/masks/: the binary pred_mask of each image "
                                                        "(its heatmap at or above the stored pixel threshold)")
    p.add_argument("--no-images", action="store_true", help="skip the per-image PNGs")
    p.add_argument("--int8", action="store_true", help="an exported folder: its INT8 graphs (OpenVINO)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_detect_flags(p)

    p = add("serve", help="an inspection service for the line: HTTP API, operator page, metrics (FastAPI + uvicorn)")
    p.add_argument("run_dir", type=Path, help="a run directory, or a folder written by ddad export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (another than localhost needs --token-file)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one)")
    p.add_argument("--token-file", type=Path, help="file holding the token that clients send as "
                                                   "'Authorization: Bearer TOKEN'")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more images")
    p.add_argument("--max-queue", type=int, default=64, help="images waiting at most (then 503 with Retry-After)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait and run (then 504)")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body")
    p.add_argument("--decision-log", type=Path, help="append every decision to this JSON-lines file (flushed each)")
    p.add_argument("--quiet", action="store_true", help="only warnings from the server")

    p = add("demo", help="synthetic data -> train -> test, on the CPU in a few minutes")
    p.add_argument("out", type=Path, nargs="?", default=Path("ddad-demo"), help="output folder")
    p.add_argument("--epochs", type=int, default=80, help="training epochs of the tiny UNet")
    p.add_argument("--category", default="washer", help="synthetic category: washer or stripes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser
