"""INT8 graphs of an exported model (``ddad export RUN --format openvino --int8``), with NNCF.

Any method's export: the graphs its runtime model names as quantised (DDAD: the UNet and the scorer with its
feature extractor; PatchCore: the patch-feature graph). Calibration uses defect-free training images only: the
fp32 export scores them through the runtime (:mod:`ddad_infer`) while every graph's inputs are recorded (for
DDAD the UNet's x_t and t at each step of Alg. 1, the scorer's y and x0). Per graph, post-training
quantisation of weights and activations (NNCF's mixed preset) is tried first; where the whole model's anomaly
maps on other defect-free training images then move by more than :data:`MAP_TOLERANCE` of their fp32 range,
the graphs fall back one by one, in the model's order, to weights-only INT8 (their activations stay fp32:
published experience with diffusion UNets, e.g. optimum-intel's hybrid mode, is that quantised activations of
the noise predictor cost accuracy). The manifest records what was chosen per graph, and the measured
deviation.

INT8 scores are not fp32 scores: where the export carries decisions, the INT8 model's own are chosen on the
run's validation split (scored by the INT8 graphs), for the same target as the fp32 ones (their false-alarm
rate, or F1 on the validation defects), and stored in the manifest's ``int8`` record; the runtime decides
INT8 scores with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_text

MAP_TOLERANCE = 0.02  # max |map_int8 - map_fp32| over the check images, as a share of the fp32 maps' range
INT8_IMAGES = 16  # defect-free training images that calibrate ``--int8``, and as many others that check it
MODES = ("post-training (weights and activations)", "weights only")


def _record(model, images: np.ndarray) -> dict[str, list[dict]]:
    """Every input each quantised graph of the fp32 ``model`` sees while scoring ``images``."""
    seen: dict[str, list[dict]] = {name: [] for name in model.QUANTISED}
    graphs = dict(model.graphs)
    for name in model.QUANTISED:
        model.graphs[name] = lambda inputs, g=graphs[name], n=name: (seen[n].append(
            {k: np.array(v, copy=True) for k, v in inputs.items()}), g(inputs))[1]
    try:
        model.score(images)
    finally:
        model.graphs = graphs
    return seen


STRATEGIES = ("auto", "full", "weights")  # auto: full, then weights-only graph by graph while beyond tolerance


def quantize_run_export(folder: Path, data, seed: int, progress: bool = True, strategy: str | bool = "auto",
                        crop: float = 1.0) -> dict:
    """:func:`quantize_export` with 2 x :data:`INT8_IMAGES` defect-free training images of the run's ``data``
    (seeded): half calibrate, the other half check; then the INT8 model's own decisions (:func:`int8_decisions`;
    ``crop``: the run's centre crop of maps and masks, as its pixel thresholds are chosen)."""
    from .data.splits import calibration_set

    images = calibration_set(data, 2 * INT8_IMAGES, seed)[0].numpy()
    half = max(1, (len(images) + 1) // 2)  # fewer than 2 x INT8_IMAGES: half each (one: itself)
    record = quantize_export(folder, images[:half], images[half:] if len(images) > 1 else images, progress,
                             "auto" if strategy is True else strategy)
    manifest_path = folder / "export.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("decisions") is not None:
        decisions = int8_decisions(folder, data, manifest["decisions"], crop)
        if decisions is not None:
            record["decisions"] = manifest["int8"]["decisions"] = {**decisions,
                                                                   "calibration_key": manifest["decisions_key"]}
            atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return record


def int8_decisions(folder: Path, data, fp32: dict, crop: float = 1.0) -> dict | None:
    """The INT8 model's decisions, chosen on the run's validation split as the fp32 ``decisions`` were (their
    target: a false-alarm rate, else F1-optimal on the validation defects); None without a validation split."""
    import ddad_infer

    from .data.anomalies import synthetic_origin
    from .data.splits import load_validation_split
    from .engine.thresholds import choose_decisions
    from .scoring import crop as centre_crop

    val = load_validation_split(data, progress=False)
    if val is None:
        return None
    model = ddad_infer.load(folder, backend="openvino", precision="int8")
    categories = [s.category for s in val.samples]
    out = model.score(val.images.numpy(), categories if len(model.categories) > 1 else None)
    maps = masks = None
    if val.has_masks:
        import torch

        maps = centre_crop(torch.from_numpy(out["anomaly_map"]), crop).flatten(1).numpy()
        masks = centre_crop(val.masks, crop).flatten(1).numpy() > 0.5
    defects = "synthetic" if any(synthetic_origin(s) for s in val.samples) else "real"
    rule = fp32.get("target") or {}
    target = None if rule.get("default") or "f1" in rule else rule.get("max_false_alarms")  # the same rule
    decisions = choose_decisions(out["score"], val.labels, categories, maps, masks, target, defects)
    return decisions.to_dict()


def quantize_export(folder: Path, calibration: np.ndarray, check: np.ndarray, progress: bool = True,
                    strategy: str = "auto") -> dict:
    """Write NAME.int8.xml/.bin for each graph of the OpenVINO export in ``folder`` (module docstring) and add
    them to its manifest; ``calibration`` and ``check``: disjoint defect-free images (N, C, H, W) in [-1, 1].
    ``strategy``: auto (the module docstring's rule), full (weights and activations of every graph, whatever
    the deviation) or weights (weights only, every graph). Returns the manifest's ``int8`` record."""
    if strategy not in STRATEGIES:
        raise ValueError(f"INT8 strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    import nncf
    import openvino as ov

    import ddad_infer

    from .export import file_entry

    manifest_path = folder / "export.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest["format"] != "openvino":
        raise ValueError("--int8 quantises OpenVINO graphs: export with --format openvino --int8")
    fp32 = ddad_infer.load(folder, backend="openvino")
    graphs = fp32.QUANTISED
    samples = _record(fp32, calibration)
    core = ov.Core()

    def write(name: str, mode: str) -> list[Path]:
        model = core.read_model(str(folder / f"{name}.xml"))
        if mode == MODES[0]:
            model = nncf.quantize(model, nncf.Dataset(samples[name]), subset_size=len(samples[name]),
                                  preset=nncf.QuantizationPreset.MIXED)
        else:
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        xml = folder / f"{name}.int8.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        return [xml, xml.with_suffix(".bin")]

    reference = fp32.score(check)["anomaly_map"]
    span = float(reference.max() - reference.min()) or 1.0
    chosen = {name: MODES[1 if strategy == "weights" else 0] for name in graphs}
    tried = []
    # full PTQ; then (DDAD) the UNet's activations back to fp32; then both (auto); one try otherwise
    for fallback in (None, *graphs) if strategy == "auto" else (None,):
        if fallback is not None:
            chosen[fallback] = MODES[1]
        for name in graphs:
            manifest["graphs"][name]["openvino-int8"] = file_entry(write(name, chosen[name]))
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
        maps = ddad_infer.load(folder, backend="openvino", precision="int8").score(check)["anomaly_map"]
        error = float(np.abs(maps - reference).max()) / span
        tried.append({**chosen, "max_map_error": error})
        if progress:
            print(f"INT8: {chosen} -> maps within {error:.4f} of the fp32 range", flush=True)
        if error <= MAP_TOLERANCE:
            break
    record = {"strategy": strategy, "graphs": dict(chosen), "max_map_error": tried[-1]["max_map_error"], "tolerance": MAP_TOLERANCE,
              "within_tolerance": tried[-1]["max_map_error"] <= MAP_TOLERANCE, "tried": tried,
              "calibration_images": len(calibration), "check_images": len(check),
              "images": "defect-free training images of the run", "decisions": None}
    manifest["int8"] = record
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return record
