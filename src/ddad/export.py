"""Exported models, for any method: write a network as an ONNX graph (torch.onnx, dynamo exporter, dynamic
batch) and as OpenVINO IR, write the folder's manifest (export.json: graph files and their SHA-256, the
calibration key and the decisions chosen under it), and run denoiser and feature-extractor graphs in ONNX
Runtime behind the same call signatures as the PyTorch modules, so a method's detector runs unchanged on
either. What a method exports is its own (``ddad.methods.ddad.graphs``, ``ddad.methods.patchcore.graphs``);
:mod:`ddad_infer` reads the folders.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ddad_infer.model import FORMAT_VERSION, MANIFEST, file_sha256  # one hash and version to write and check

from .checkpoint import atomic_write_text
from .engine.calibration import ThresholdMismatch, stored_threshold
from .runs import RunDir

FORMATS = ("onnx", "openvino")
EXPORT_DIR = "export"  # a run's exported model, RUN_DIR/export, unless told another folder


def require_onnx() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise RuntimeError("ONNX support needs onnx, onnxscript and onnxruntime: pip install 'ddad[onnx]'") from None


class ExtractorGraph(torch.nn.Module):
    """A feature extractor with its stages fixed, as an exportable module (one output per stage)."""

    def __init__(self, extractor, layers: Sequence[int]) -> None:
        super().__init__()
        self.extractor = extractor
        self.layers = tuple(layers)

    def forward(self, x: torch.Tensor):
        return tuple(self.extractor(x, self.layers))


def export_graph(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str]) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = tuple({0: batch} for _ in args)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, input_names=input_names,
                                    output_names=output_names, verbose=False)
    tmp = path.with_suffix(".onnx.tmp")
    program.save(str(tmp))
    tmp.replace(path)


def to_openvino(onnx_path: Path) -> list[Path]:
    """The ONNX graph converted to OpenVINO IR beside it (fp32 weights kept): [xml, bin]."""
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeError("--format openvino needs OpenVINO: pip install 'ddad[openvino]'") from None
    xml = onnx_path.with_suffix(".xml")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return [xml, xml.with_suffix(".bin")]


def file_entry(paths: Sequence[Path]) -> dict:
    """A manifest's record of files: their names (inside the folder) and SHA-256."""
    return {"files": [p.name for p in paths], "sha256": [file_sha256(p) for p in paths]}


def export_decisions(run: RunDir, key) -> dict | None:
    """The decisions (thresholds, normalisation) the run chose under calibration key ``key``, for an export;
    None (with a warning: the export then gives raw scores) when there are none for these settings."""
    decisions = None
    try:
        decisions = stored_threshold(run, key, f"Run `ddad test {run.root}` with these settings")
    except ThresholdMismatch as exc:  # the graphs are still right; only their decisions are missing
        print(f"warning: exported without decisions (raw scores only): {exc}", file=sys.stderr)
    if decisions is None:
        print(f"warning: no thresholds chosen under these settings: the export gives raw scores only; run "
              f"`ddad test {run.root}` with them first, then export again", file=sys.stderr)
        return None
    return {k: v for k, v in decisions.items() if k not in ("key", "colour_scale")}


def write_manifest(out_dir: Path, run: RunDir, method: str, model: str, fmt: str, key, graphs: dict,
                   **facts) -> Path:
    """OUT_DIR/export.json: the method, the kind of ``model`` (how the runtime runs it: diffusion, bank or
    graph, :mod:`ddad_infer.methods`), format, calibration key with its settings, the decisions chosen under
    it, every graph's files by kind (``graphs``: name -> {onnx | openvino: [paths]}) and the method's own
    ``facts`` (their files recorded by the caller with :func:`file_entry`)."""
    decisions = None if key is None else export_decisions(run, key)
    info = {"format_version": FORMAT_VERSION, "method": method, "model": model, "format": fmt,
            "run": str(run.root.resolve()), **facts,
            "graphs": {name: {kind: file_entry(paths) for kind, paths in kinds.items()} for name, kinds in graphs.items()},
            "calibration_key": None if key is None else key.digest,
            "settings": None if key is None else json.loads(json.dumps(key.as_dict(), default=str)),
            "decisions": decisions,
            "decisions_key": None if decisions is None else decisions.get("calibration_key", key.digest)}
    atomic_write_text(out_dir / MANIFEST, json.dumps(info, indent=2))
    return out_dir


def save_array(path: Path, array) -> dict:
    """``array`` as float32 .npy, written atomically; its manifest entry."""
    tmp = path.with_suffix(".npy.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.float32))
    tmp.replace(path)
    return file_entry([path])


def bank_facts(loaded, banks: dict, run: RunDir, out_dir: Path, progress: bool = True) -> dict:
    """The manifest facts of a memory-bank model of a :class:`LoadedDetector`: its categories, each bank
    (name -> (M, D) tensor) as OUT_DIR/bank-I.npy (the manifest maps names to files), and, for several
    categories, the run's category recogniser's reference embeddings as OUT_DIR/recognition.npy with their
    labels."""
    from .engine.recognition import build_recogniser

    facts = {"categories": list(loaded.categories), "recognition": None,
             "banks": {name: save_array(out_dir / f"bank-{i}.npy", bank.float().cpu().numpy())
                       for i, (name, bank) in enumerate(banks.items())}}
    recogniser = build_recogniser(run, loaded.data, loaded.embed, loaded.embed_identity, loaded.batch_size, progress)
    if recogniser is not None:
        facts["recognition"] = {"labels": recogniser.labels,
                                **save_array(out_dir / "recognition.npy", recogniser.references.numpy())}
    return facts


def export_graphs(modules: dict, out_dir: Path, fmt: str, progress: bool = True) -> dict:
    """Each of ``modules`` (name -> (module, example args, input names, output names)) written as
    OUT_DIR/NAME.onnx, and as OpenVINO IR beside it for ``fmt`` openvino, with a bar over the files;
    returns name -> {kind: [paths]} for :func:`write_manifest`."""
    from tqdm.auto import tqdm

    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require_onnx()
    bar = tqdm(total=len(modules) * (2 if fmt == "openvino" else 1), desc=f"export ({fmt} graphs)", unit="graph",
               disable=not progress, dynamic_ncols=True)
    files = {}
    for name, (module, args, inputs, outputs) in modules.items():
        bar.set_postfix_str(f"{name}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_graph(module, args, out_dir / f"{name}.onnx", inputs, outputs)
        files[name] = {"onnx": [out_dir / f"{name}.onnx"]}
        bar.update(1)
    if fmt == "openvino":
        for name in modules:
            bar.set_postfix_str(f"{name}.xml")
            files[name]["openvino"] = to_openvino(out_dir / f"{name}.onnx")
            bar.update(1)
    bar.close()
    return files


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {path} (run ddad export first)")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OnnxDenoiser:
    """eps_theta(x_t, t) evaluated by ONNX Runtime; callable like the UNet."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.session = _session(Path(path), threads)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"x": x.detach().float().cpu().numpy(),
                                      "t": t.detach().cpu().numpy().astype(np.int64)})[0]
        return torch.from_numpy(out).to(x.device)


class OnnxExtractor:
    """The exported feature extractor; callable like :class:`FeatureExtractor` for its stages."""

    def __init__(self, path: Path, layers: Sequence[int], threads: int | None = None) -> None:
        self.session = _session(Path(path), threads)
        self.layers = tuple(layers)

    def __call__(self, x: torch.Tensor, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        if layers is not None and tuple(layers) != self.layers:
            raise ValueError(f"the exported extractor gives stages {self.layers}, not {tuple(layers)}")
        outs = self.session.run(None, {"image": x.detach().float().cpu().numpy()})
        return [torch.from_numpy(o).to(x.device) for o in outs]

    # The Detector treats extractors as modules.
    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self

    def requires_grad_(self, flag: bool = True):
        return self


