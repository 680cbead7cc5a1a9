"""What each ``ddad`` subcommand does: settings in, a call of the Python API, a short report out."""

from __future__ import annotations

import sys

from ..config import ConfigError, merge, parse_assignment
from .settings import run_settings, train_settings

def cmd_train(args) -> int:
    from ..api import train_run

    config, run_dir = train_settings(args)
    result = train_run(config, run_dir, resume=args.resume, progress=not args.quiet)
    if isinstance(result, dict):  # one model per category
        for category, r in result.items():
            print(f"{category}: {r.epochs_done} epochs ({r.steps_done} steps, stopped by {r.stopped_by})")
            if r.warning:
                print(f"warning: {category}: {r.warning}", file=sys.stderr)
            if r.stopped_by == "interrupted":
                print(f"ddad train: interrupted in {category}; run the same command again to continue",
                      file=sys.stderr)
                return 130
        print(f"run: {run_dir} (one run per category; ddad test {run_dir} tests them all)")
        return 0
    if result.stopped_by == "interrupted":
        print(f"ddad train: interrupted at step {result.steps_done}; saved {result.checkpoint}\n"
              f"continue with: ddad train --resume --run-dir {run_dir}", file=sys.stderr)
        return 130
    if result.stopped_by == "fitted":  # a memory bank: nothing trained
        print(f"fitted the memory bank(s) ({result.images_per_second:.1f} img/s)\nrun: {run_dir}")
        return 0
    print(f"trained {result.epochs_done} epochs ({result.steps_done} steps, stopped by {result.stopped_by}); "
          f"last loss {result.last_loss:.4g}; {result.images_per_second:.1f} img/s\ncheckpoint: "
          f"{result.checkpoint}\nrun: {run_dir}")
    for warning in (result.warning or "").splitlines():
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    from ..methods.ddad.official import import_official
    from ..methods.ddad.settings import DDADConfig

    data = {"data": {"dataset": args.dataset, "root": args.data_root, "category": args.category,
                     "image_size": args.image_size, "channels": args.channels}}
    for assignment in args.set:
        data = merge(data, parse_assignment(assignment))
    config = DDADConfig.from_dict(merge(DDADConfig().to_dict(), data))
    path = import_official(args.checkpoint, args.run_dir, config, preset=args.model, epoch=args.epoch)
    print(f"imported {args.checkpoint} as {path}\nrun: {args.run_dir}  (next: ddad test {args.run_dir})")
    return 0


def cmd_adapt(args) -> int:
    import shutil

    from ..api import adapt_run
    from ..methods.ddad.extractors import adapted_dir
    from ..runs import RunDir

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
    from ..engine.testing import write_csv
    from ..methods.ddad.sweep import sweep

    run, config = run_settings(args)
    rows = sweep(run, config, args.ws or [config.detect.sampler.w], args.vs, args.modes, args.extractors,
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
    from ..api import export

    run, config = run_settings(args)
    out = export(run, config, args.out, progress=not args.quiet, fmt=args.format, int8=args.int8)
    print(f"exported to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def cmd_presets(args) -> int:
    from ..methods.ddad.presets import format_table

    print(format_table(args.preset))
    return 0


def cmd_test(args) -> int:
    from ..api import test_output_dir, test_run
    from ..engine import per_category
    from ..runs import RunDir

    if per_category.is_parent(RunDir(args.run_dir)):  # one run per category: each with its own settings
        metrics = test_run(args.run_dir, None, args.out, save_images=not args.no_images, progress=not args.quiet,
                           max_false_alarms=args.max_false_alarms)
        print(format_metrics(metrics))
        print(f"metrics: {(args.out or RunDir(args.run_dir).test_dir) / 'metrics.json'} (each category's in its folder)")
        return 0
    run, config = run_settings(args)
    out = args.out or test_output_dir(run, config)
    metrics = test_run(run, config, out, save_images=not args.no_images, progress=not args.quiet,
                       max_false_alarms=args.max_false_alarms)
    if metrics is None:  # another rank of a torchrun job: rank 0 reports
        return 0
    print(format_metrics(metrics))
    decision = metrics.info.get("decision")
    if decision is not None:
        rate = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        own = metrics.info.get("category_thresholds")
        print(f"threshold {metrics.threshold:.6g} ({metrics.threshold_source})"
              + (f", each of the {len(own)} categories its own from its validation images" if own else "")
              + f"; on the test set: false alarms {rate(decision['false_alarm_rate'])}, misses "
                f"{rate(decision['miss_rate'])}")
        recognition = metrics.info.get("category_recognition")
        if recognition is not None:
            print(f"category recognition: {100 * recognition['accuracy']:.1f} % of {recognition['images']} test "
                  "images named their own category")
    print(f"metrics: {out / 'metrics.json'}\nscores:  {out / 'scores.csv'}"
          + ("" if args.no_images else f"\nimages:  {out / 'images'}"))
    if args.report:
        from ..report import write_report

        print(f"report:  {write_report(run, out)}")
    return 0


def cmd_tune(args) -> int:
    import json

    from ..api import tune_run
    from ..engine.tuning import parse_grid

    _, rows, threshold = tune_run(args.run_dir, parse_grid(args.grid) or None, progress=not args.quiet,
                                  max_false_alarms=args.max_false_alarms, seeds=args.defect_seeds,
                                  kinds=args.defect_kinds)
    names = [k for k in rows[0] if k not in ("image_auroc", "pixel_auroc", "objective", "kinds", "seeds")]
    show = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    print("  ".join(names) + "  image AUROC  pixel AUROC  objective (validation)")
    for r in rows:
        print("  ".join(show(r[n]) for n in names) + f"  {show(r['image_auroc'])}  {show(r['pixel_auroc'])}  "
              f"{show(r['objective'])}")
    record = json.loads((args.run_dir / "tune.json").read_text())
    rule = record["rule"]
    print(f"chosen: {', '.join(f'{n}={v}' for n, v in record['chosen'].items())} (stored in "
          f"{args.run_dir / 'config.yaml'})")
    defects = rule.get("defects") or {}
    if "real" in defects:
        print(f"validation defects: {defects['real']} real (yours)")
    elif defects:
        print(f"validation defects: {defects['synthetic']} synthetic, seeds {', '.join(map(str, defects['seeds']))}")
    if "spread_over_seeds" in rule:
        best = rows[rule["best_on_mean"]]
        verdict = "kept the current settings" if rule["kept_current"] else "chosen"
        print(f"rule: the best on the mean over defect seeds ({', '.join(f'{n}={best[n]}' for n in names)}) gains "
              f"{rule['gain_over_current']:+.4f} over the current settings (standard error over the seeds "
              f"{rule['standard_error']:.4f}): {verdict}")
    print(f"threshold {threshold.value:.6g} ({threshold.source}; stored in {args.run_dir / 'threshold.json'}); "
          "run ddad test for the test metrics")
    return 0


def cmd_report(args) -> int:
    from ..report import write_report
    from ..runs import RunDir

    print(f"report: {write_report(RunDir(args.run_dir).require(), args.test_dir, args.out)}")
    return 0


def count(n: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_metrics(metrics) -> str:
    """The overall line, then one line per category and their mean where there are several."""

    def f(v):
        return "n/a" if v is None else f"{v:.4f}"

    def line(name, m):
        return (f"{name}: image AUROC {f(m.image_auroc)}  pixel AUROC {f(m.pixel_auroc)}  PRO {f(m.pro)}  "
                f"({m.n_images} images, {m.n_defective} defective)")

    lines = [line(metrics.dataset, metrics.overall)]
    if len(metrics.categories) > 1:
        lines += [line(f"  {name}", m) for name, m in metrics.categories.items()]
        lines.append(line("  mean of categories", metrics.mean))
    return "\n".join(lines)


def predict_exported(args) -> int:
    """``ddad predict EXPORT_DIR IMAGES``: a folder of ``ddad export`` scored by ddad-infer's torch-free runtime,
    which writes the scores.csv columns an export can fill (and masks/ with --masks), as ``ddad-infer`` does."""
    from ddad_infer.cli import main as infer

    from .parser import DETECT_FLAG_DESTS

    fixed = [f"--{d.replace('_', '-')}" for d in DETECT_FLAG_DESTS
             if d != "backend" and getattr(args, d) not in (None, False, [])]
    fixed += [flag for flag, given in (("--threshold", args.threshold is not None), ("--exclude", args.exclude)) if given]
    if fixed or args.backend == "torch":
        raise ConfigError(f"{', '.join(fixed) or '--backend torch'}: {args.run_dir} is an exported folder, which "
                          "scores with the graphs, settings and thresholds it was exported with (backend onnxruntime "
                          "or openvino); predict with the run itself, or export again with the settings")
    argv = [str(args.run_dir), *map(str, args.paths), "--out", str(args.out)]
    argv += ["--backend", args.backend] if args.backend else []
    argv += ["--category", args.image_category] if args.image_category else []
    argv += [flag for flag, given in (("--masks", args.masks), ("--int8", args.int8)) if given]
    return infer(argv)


def cmd_predict(args) -> int:
    from ..api import predict

    if (args.run_dir / "export.json").is_file():
        return predict_exported(args)
    if args.int8:
        raise ConfigError(f"--int8 runs the INT8 graphs of an exported folder; {args.run_dir} is a run: "
                          f"`ddad export {args.run_dir} --format openvino --int8 --out DIR`, then `ddad predict DIR ...`")
    run, config = run_settings(args)
    rows = predict(run, args.paths, args.out, args.threshold, config, save_images=not args.no_images,
                   progress=not args.quiet, exclude=args.exclude, masks=args.masks, category=args.image_category)
    scored = [r for r in rows if r["error"] is None]
    flagged = sum(r["decision"] == "defective" for r in scored)
    decided = bool(scored) and scored[0]["decision"] is not None
    print(f"scored {count(len(scored), 'image')}" + (f"; {flagged} flagged defective" if decided else
                                            " (no threshold: run ddad test or pass --threshold)")
          + (f"; {len(rows) - len(scored)} unreadable (see scores.csv)" if len(rows) > len(scored) else ""))
    sources = dict.fromkeys((r["category"], r["threshold"], r["threshold_source"]) for r in scored if decided)
    for category, value, source in list(sources)[:20]:
        print(f"threshold{' of ' + category if len(sources) > 1 and category else ''} {value:.6g}: {source}")
    print(f"scores: {args.out / 'scores.csv'}")
    return 0


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from ..serving.app import ServeConfig, create_app
        from ..serving.predictor import Predictor
    except ImportError as exc:
        raise RuntimeError(f"ddad serve needs FastAPI and uvicorn: pip install 'ddad[serve]' ({exc})") from None
    token = None
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
        if len(token) < 16:
            raise ConfigError(f"the token in {args.token_file} is {len(token)} characters; use at least 16")
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        raise ConfigError(f"--host {args.host} lets other machines in: give a --token-file (clients send "
                          "'Authorization: Bearer TOKEN')")
    config = ServeConfig(max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout,
                         max_upload_mb=args.max_upload_mb, token=token, decision_log=args.decision_log)
    app = create_app(Predictor(args.run_dir), config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                timeout_graceful_shutdown=int(args.timeout) + 5)
    return 0


def cmd_synth(args) -> int:
    from ..data.synth import CATEGORIES, SynthConfig, generate

    cfg = SynthConfig(size=args.size, train=args.train, test_good=args.test_good,
                      test_defective_per_type=args.test_defective, seed=args.seed,
                      categories=tuple(args.categories or CATEGORIES))
    for folder in generate(args.out, cfg):
        print(f"wrote {folder}")
    return 0


def cmd_combine(args) -> int:
    from ..data.combine import Source, combine

    counts = combine([Source.parse(spec) for spec in args.sources], args.out, args.data_seed)
    for category, c in counts.items():
        print(f"{category}: {c['train']} train, {c['test']} test images, {c['masks']} masks")
    print(f"wrote {args.out}: train one model on all of them with\n  ddad train --method drdc --data-root "
          f"{args.out} --category all ...")
    return 0


def cmd_demo(args) -> int:
    from ..api import demo

    metrics, run_dir = demo(args.out, epochs=args.epochs, category=args.category, progress=not args.quiet)
    print(format_metrics(metrics))
    print(f"run:     {run_dir}\nmetrics: {run_dir / 'test' / 'metrics.json'}\nimages:  {run_dir / 'test' / 'images'}"
          f"\nreport:  {run_dir / 'report' / 'index.html'}")
    return 0
