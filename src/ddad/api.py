"""The Python API: the same operations as the ``ddad`` command, one function each, for any method.

    from ddad import DDADConfig, train_run, test_run, predict, load_config
    config = load_config("runs/washer")                       # the run's settings, typed by its method
    metrics = test_run("runs/washer", with_detection(config, w=5))   # another w, same run
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .backbones import WeightsNotFound, resolve_weights
from .checkpoint import atomic_write_text
from .config import ConfigError, RunSettings
from .data.formats import DataConfig, build_index, selected_categories
from .data.splits import check_images, load_train_images
from .data.synth import SynthConfig, generate
from .diffusion.sampler import SamplerConfig
from .diffusion.unet import UNetConfig
from .engine import distributed, per_category, predicting, testing, trainer
from .engine.inference import Inferencer
from .engine.thresholds import Threshold
from .engine.recipe import TrainConfig
from .engine.trainer import TrainResult
from .methods import get_method, load_run_config
from .methods.ddad.adaptation import adapt
from .methods.ddad.loading import load_detector as load_ddad_detector
from .methods.ddad.settings import DDADConfig, DetectConfig
from .report import write_report
from .results import TestMetrics
from .runs import RunDir
from .runtime import RuntimeConfig, resolve_device
from .scoring import ScoringConfig


def load_config(run_dir: Path | str | RunDir) -> RunSettings:
    """The run's settings (config.yaml, as any version wrote it), typed by its method."""
    return load_run_config(_run(run_dir).require())


def with_detection(config: Any, **changes: Any) -> Any:
    """``config`` with detection settings replaced by name (e.g. ``w=5``, ``mode="pixel"``, ``batch_size=4``)."""
    return get_method(config.method).with_detection(config, **changes)


def _run(run_dir: Path | str | RunDir) -> RunDir:
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def train_run(config: Any, run_dir: Path | str, resume: bool = False, progress: bool = True,
              on_step=None) -> TrainResult:
    """Train ``config`` (any method's settings) into ``run_dir`` (created), or continue it with ``resume``.
    A one-model-per-category method (DDAD) given several categories trains them one after another into
    RUN_DIR/<category>/ (see :mod:`ddad.engine.per_category`) and returns {category: TrainResult}. A time
    budget (``max_minutes``) counts from this call: loading the images and building the model are part of it."""
    started = trainer.clock()
    run = RunDir(run_dir)
    method = get_method(config.method)
    if getattr(method, "one_model_per_category", False) and len(selected_categories(config.data)) > 1:
        return per_category.train_each(config.replace(data=config.data.absolute()), run, lambda c, r, again:
                                       train_run(c, r.root, again, progress, on_step))
    main_rank = distributed.context(resolve_device(config.train.device).type).is_main  # torchrun: rank 0 writes
    with run.locked("training") if main_rank else nullcontext():  # a second training of the run stops here
        return _train_locked(config, run, method, resume, progress, on_step, main_rank, started)


def _train_locked(config: Any, run: RunDir, method, resume: bool, progress: bool, on_step, main_rank: bool,
                  started: float):
    if resume:
        stored = load_config(run)
        trainings = {f.name: getattr(config, f.name) for f in fields(config)
                     if isinstance(getattr(config, f.name), TrainConfig)}  # DRDC trains two models
        if replace(stored, **trainings) != replace(config, data=config.data.located(run.root)):
            raise ConfigError(f"--resume: settings differ from {run.config_path}; only train settings may change")
    elif run.checkpoints() or any(run.banks_dir.glob("*.safetensors")):
        raise ConfigError(f"run directory {run.root} already holds checkpoints or memory banks; pass --resume to "
                          f"continue it or choose another --run-dir")
    if not resume:  # a run finds its data from any working directory
        config = config.replace(data=config.data.absolute())
    index = build_index(config.data)
    method.check_training_set(config, index)
    print(index.describe())
    if not resume:  # a bad test file stops now, not after the training
        check_images(index.test, config.data, "test", progress=progress)
    if main_rank:
        run.root.mkdir(parents=True, exist_ok=True)
        run.save_config(config)
        atomic_write_text(run.root / "dataset.json", json.dumps(index.statistics(), indent=2))
    # Several categories: uint8 in memory (a quarter of float32's; all of VisA at 256 px is ~7 GB as float).
    images = load_train_images(config.data, index, progress and main_rank, run.log if main_rank else None,
                               uint8=len(index.categories) > 1)
    return method.fit(run, config, images, resume=resume, progress=progress, on_step=on_step, index=index,
                      started=started)


def test_run(run_dir: Path | str | RunDir, config: Any = None, out_dir: Path | None = None, save_images: bool = True,
             progress: bool = True, cache: bool = True, max_false_alarms: float | None = None) -> TestMetrics:
    """Evaluate the run on its test split with ``config`` (default: the run's settings); the threshold is
    chosen on its validation split (F1 on real validation defects, else ``max_false_alarms`` or 1 % false
    alarms). Writes to ``out_dir``, by default :func:`test_output_dir` (other settings than the run's go to
    RUN_DIR/experiments/). A parent run of one model per category tests each and writes their table with the
    mean."""
    run = _run(run_dir)
    if per_category.is_parent(run):
        return per_category.test_each(run, lambda r, out: test_run(r, None, out, save_images, progress, cache,
                                                                   max_false_alarms), out_dir)
    run = run.require()
    config = config or load_config(run)
    out_dir = Path(out_dir) if out_dir is not None else test_output_dir(run, config)
    loaded = get_method(config.method).load(run, config, progress)
    return testing.test_run(run, loaded, out_dir, save_images, progress, cache, max_false_alarms)


def _without_runtime(config: Any) -> Any:
    return replace(config, runtime=None) if any(f.name == "runtime" for f in fields(config)) else config


def test_output_dir(run_dir: Path | str | RunDir, config: Any = None) -> Path:
    """Where ``ddad test`` writes by default: RUN_DIR/test for the run's own settings, RUN_DIR/experiments/
    test-<digest of the settings> for others (``--w 5``, ``with_detection(...)``), so that an experiment
    never replaces the run's own test outputs."""
    run = _run(run_dir)
    own = load_config(run)
    if config is None or _without_runtime(config) == _without_runtime(own):  # device, batch size: same results
        return run.test_dir
    digest = hashlib.sha256(config.to_yaml().encode()).hexdigest()[:10]
    return run.root / "experiments" / f"test-{digest}"


def predict(run_dir: Path | str | RunDir, paths: Sequence[Path | str], out_dir: Path, threshold: float | None = None,
            config: Any = None, save_images: bool = True, progress: bool = True,
            exclude: Sequence[str] = (), masks: bool = False, category: str | None = None) -> list[dict]:
    """Score unlabelled images; writes OUT/scores.csv (category, score, threshold, pred_score, pred_label,
    decision), heatmap PNGs and, with ``masks``, the binary pred_mask PNGs. A model of several categories
    takes each image as ``category`` when given, else as its folder or the recognised category names it.
    Returns one dict per file."""
    run = _run(run_dir).require()
    config = config or load_config(run)
    loaded = get_method(config.method).load(run, config, progress)
    return predicting.predict(run, loaded, paths, out_dir, threshold, save_images, progress, exclude, masks,
                              category)


def tune_run(run_dir: Path | str | RunDir, grid: Mapping[str, Sequence[Any]] | None = None,
             progress: bool = True, max_false_alarms: float | None = None, seeds: Sequence[int] | None = None,
             kinds: Sequence[str] | None = None) -> tuple[Any, list[dict], Threshold]:
    """Choose detection settings on the run's validation split (never the test split) from ``grid`` (default
    the grids of :data:`ddad.engine.tuning.GRIDS` for its method) and store them in its config.yaml and
    RUN_DIR/tune.json; then choose the chosen settings' thresholds on the same split, for ``max_false_alarms``
    or F1-optimal on validation defects, and store them (RUN_DIR/threshold.json) for ``ddad predict``.
    Without real validation defects, synthetic ones of ``kinds`` (default every kind) drawn with each of
    ``seeds`` (default :data:`ddad.engine.tuning.SEEDS`, and further seeds where the held-out images are
    too few for :data:`ddad.engine.tuning.MIN_DEFECTS` defects); a candidate replaces the current settings only where
    its mean gain over the seeds beats that mean's standard error (:func:`ddad.engine.tuning.robust_choice`). Returns the new settings, one row per
    candidate and the image threshold."""
    run = _run(run_dir).require()
    with run.locked("tune"):  # it rewrites config.yaml and threshold.json
        return _tune_locked(run, grid, progress, max_false_alarms, seeds, kinds)


def _tune_locked(run: RunDir, grid, progress: bool, max_false_alarms: float | None, seeds, kinds):
    from .data.anomalies import SyntheticAnomalies
    from .engine import tuning

    config = load_config(run)
    method = get_method(config.method)
    grids = [dict(grid)] if grid else list(tuning.GRIDS[config.method])
    names = tuning.setting_names(grids)
    current = tuning.current_values(config, names)
    synthetic = SyntheticAnomalies(tuple(kinds)) if kinds else None
    best, rows, rule = tuning.tune(run, config, lambda c: method.load(run, c, progress=False), grids, progress,
                                   tuple(seeds) if seeds else None, synthetic)
    chosen = tuning.current_values(best, names)
    run.save_config(best)
    decisions = testing.store_validation_thresholds(run, method.load(run, best, progress=False), max_false_alarms,
                                                    progress=False)
    image = decisions.shared.image
    atomic_write_text(run.root / "tune.json", json.dumps({
        "chosen": chosen, "before": current, "rows": rows,
        "objective": "mean of image and pixel AUROC on the validation split", "rule": rule,
        "threshold": {"value": image.value, "source": image.source, "target": image.target,
                      "categories": {c: d.image.value for c, d in decisions.categories.items()}}},
        indent=2, default=str))
    run.log(f"tune: {current} -> {chosen} (on the validation split); threshold {image.value:.6g} ({image.source})")
    return best, rows, image


def export(run_dir: Path | str | RunDir, config: Any = None, out_dir: Path | None = None,
           progress: bool = True, fmt: str = "onnx", int8: bool | str = False) -> Path:
    """Write the run's exported model (default RUN_DIR/export) in ``fmt`` (onnx or openvino): graphs and the
    manifest that the torch-free runtime (:mod:`ddad_infer`) scores with; ``int8`` adds INT8 graphs
    (OpenVINO, :mod:`ddad.int8`; True or a strategy of :data:`ddad.int8.STRATEGIES`)."""
    run = _run(run_dir).require()
    config = config or load_config(run)
    if int8 and fmt != "openvino":
        raise ValueError("--int8 writes OpenVINO graphs: add --format openvino")
    folder = get_method(config.method).export(run, config, out_dir, progress, fmt)
    if int8:
        from .int8 import quantize_run_export

        quantize_run_export(folder, config.data, config.train.seed, progress, int8,
                            getattr(config.detect, "crop", 1.0))
    return folder


def load_model(run_dir: Path | str | RunDir, config: Any = None, threshold: float | None = None,
               progress: bool = False) -> Inferencer:
    """Any method's run ready to decide, as anomalib's inferencers: ``model(images, categories=None)`` gives an
    AnomalyResult with the raw ``score``, ``pred_score`` normalised (0.5 at the run's threshold), ``pred_label``,
    ``anomaly_map`` and ``pred_mask`` (see :mod:`ddad.engine.inference`). The run's stored threshold is used
    (``ddad test`` stores it), else ``threshold``."""
    run = _run(run_dir).require()
    config = config or load_config(run)
    return Inferencer.from_run(run, get_method(config.method).load(run, config, progress), threshold, progress)


def load_detector(run_dir: Path | str | RunDir, config: DDADConfig | None = None, calibrate: bool = True,
                  progress: bool = True):
    """A DDAD run's own :class:`ddad.methods.ddad.detector.Detector` (and its settings), for scripts."""
    run = _run(run_dir).require()
    config = config or load_config(run)
    detector, _ = load_ddad_detector(run, config, calibrate, progress)
    return detector, config


def adapt_run(run_dir: Path | str, overrides: dict | None = None, resume: bool = True, progress: bool = True,
              on_step=None) -> list[dict]:
    """Domain-adapt a DDAD run's feature extractor (Eq. 10) on its training images.

    ``overrides`` replaces fields of the run's ``adapt`` section (stored back into config.yaml)."""
    run = RunDir(run_dir).require()
    config = load_config(run)
    if overrides:
        config = replace(config, adapt=replace(config.adapt, **{k: v for k, v in overrides.items() if v is not None}))
        run.save_config(config)
    images = load_train_images(config.data, None, progress, run.log)
    return adapt(run, config, images, resume=resume, progress=progress, on_step=on_step)


def demo(out: Path | str, epochs: int = 80, category: str = "washer", progress: bool = True) -> tuple[TestMetrics, Path]:
    """The built-in example: synthetic data -> tiny UNet at 32 x 32 -> test with images and metrics.

    Scores combine pixel and MobileNetV2 features when torchvision's mobilenet_v2 weights are found
    offline, else pixel-only (stated in metrics.json)."""
    out = Path(out)
    data_root = out / "data"
    if not (data_root / category).is_dir():
        generate(data_root, SynthConfig(categories=(category,)))
    try:
        resolve_weights("mobilenet_v2")
        scoring = ScoringConfig(mode="combined", v=1.0, sigma=1.0)
    except WeightsNotFound:
        print("mobilenet_v2 weights not found offline: scoring pixel-only")
        scoring = ScoringConfig(mode="pixel", sigma=1.0)
    size = 32
    config = DDADConfig(
        # the validation workflow the README teaches: 10 % of the training images held out, the threshold
        # chosen on them before a test image is read (issue 28, wall 13)
        data=DataConfig(dataset="mvtec", root=str(data_root.resolve()), category=category, image_size=size,
                        channels=3),
        model=UNetConfig.tiny(size, 3),
        train=TrainConfig(epochs=epochs, batch_size=16, checkpoint_every=max(1, epochs // 4)),
        detect=DetectConfig(sampler=SamplerConfig(start_step=250, skip=25, w=3.0, eta=1.0), scoring=scoring,
                            backbone="mobilenet_v2", crop=1.0),
        runtime=RuntimeConfig(batch_size=16),
    )
    run = RunDir(out / "run")
    train_run(config, run.root, resume=bool(run.checkpoints()), progress=progress)
    metrics = test_run(run, progress=progress)
    write_report(run)
    return metrics, run.root
