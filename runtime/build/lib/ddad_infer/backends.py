"""Exported graphs run by ONNX Runtime or OpenVINO, behind one call: ``graph({name: array}) -> [arrays]``.
Neither is imported until a graph is opened, so the runtime installs with only the one it uses."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

BACKENDS = ("onnxruntime", "openvino")
Graph = Callable[[dict], list]


def _onnxruntime(path: Path, threads: int | None) -> Graph:
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("this exported model runs in ONNX Runtime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ValueError(f"cannot load the graph {path}: {exc}") from None
    return lambda inputs: session.run(None, inputs)


def _openvino(path: Path, threads: int | None) -> Graph:
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeError("this exported model runs in OpenVINO: pip install openvino") from None
    config = {"INFERENCE_PRECISION_HINT": "f32"}  # never bf16 behind the user's back: the run scored in fp32
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise ValueError(f"cannot load the graph {path}: {exc}") from None
    request = compiled.create_infer_request()

    def run(inputs: dict) -> list:
        out = request.infer(inputs)
        return [np.array(out[o]) for o in compiled.outputs]

    return run


def open_graph(path: Path, backend: str, threads: int | None = None) -> Graph:
    """The graph file ``path`` (.onnx for either backend, .xml for OpenVINO) ready to run on the CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime" and path.suffix != ".onnx":
        raise ValueError(f"ONNX Runtime cannot read {path.name}: export with --format onnx, or use --backend openvino")
    return (_onnxruntime if backend == "onnxruntime" else _openvino)(path, threads)
