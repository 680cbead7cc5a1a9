"""DDAD's exported graphs: the UNet step and the feature extractor, and the detector networks that
``--backend onnxruntime`` runs in their place.

The sampling loop (Algorithm 1) stays in Python: it is a few tensor operations per step around the
network call, and keeping it there keeps per-image seeded noise and every sampler setting available.

    RUN_DIR/export/unet.onnx        inputs x (B, C, H, W) float32, t (B,) int64 -> eps (B, C, H, W)
    RUN_DIR/export/extractor.onnx   input image (B, C, H, W) in [-1, 1] -> one output per scoring stage
    RUN_DIR/export/export.json      which run, checkpoint, backbone and stages they came from
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...checkpoint import atomic_write_text
from ...export import ExtractorGraph, OnnxDenoiser, OnnxExtractor, export_graph, require_onnx
from ...runs import RunDir
from .settings import DetectConfig

EXPORT_DIR = "export"


def export_graphs(detector, run: RunDir, config, out_dir: Path | None = None, progress: bool = True) -> Path:
    """Write unet.onnx (and extractor.onnx unless scoring is pixel-only) of ``detector`` (the run's, in
    PyTorch) into ``out_dir`` (default RUN_DIR/export)."""
    from tqdm.auto import tqdm

    require_onnx()
    out_dir = Path(out_dir) if out_dir else run.root / EXPORT_DIR
    size, channels = config.data.image_size, config.data.channels
    unet = detector.unet.float().cpu().eval()
    x = torch.zeros(2, channels, size, size)
    t = torch.tensor([250, 25], dtype=torch.long)
    bar = tqdm(total=1 + (detector.extractor is not None), desc="export (ONNX graphs)", unit="graph",
               disable=not progress, dynamic_ncols=True)
    bar.set_postfix_str("unet.onnx")
    export_graph(unet, (x, t), out_dir / "unet.onnx", ["x", "t"], ["eps"])
    bar.update(1)
    info = {"run": str(run.root.resolve()), "checkpoint": str(run.resolve_checkpoint(config.weights.checkpoint).resolve()),
            "weights": config.weights.average, "image_size": size, "channels": channels, "extractor": None}
    if detector.extractor is not None:
        layers = config.detect.scoring.feature_layers
        graph = ExtractorGraph(detector.extractor.float().cpu().eval(), layers)
        bar.set_postfix_str("extractor.onnx")
        export_graph(graph, (x,), out_dir / "extractor.onnx", ["image"], [f"stage{j}" for j in layers])
        bar.update(1)
        info["extractor"] = {"backbone": config.detect.backbone, "layers": list(layers),
                             "adapted": detector.extractor_source == "adapted"}
    bar.close()
    atomic_write_text(out_dir / "export.json", json.dumps(info, indent=2))
    return out_dir


def onnx_networks(run: RunDir, detect: DetectConfig, threads: int | None = None):
    """(denoiser, extractor or None) evaluated by ONNX Runtime, from RUN_DIR/export."""
    require_onnx()
    folder = run.root / EXPORT_DIR
    info_path = folder / "export.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: run `ddad export {run.root}` first")
    info = json.loads(info_path.read_text())
    extractor = None
    if detect.scoring.uses_features:
        if info["extractor"] is None:
            raise ValueError(f"{folder} holds no extractor graph (exported for pixel-only scoring)")
        if info["extractor"]["backbone"] != detect.backbone:
            raise ValueError(f"exported extractor is {info['extractor']['backbone']}, detection asks {detect.backbone}")
        extractor = OnnxExtractor(folder / "extractor.onnx", info["extractor"]["layers"], threads)
    return OnnxDenoiser(folder / "unet.onnx", threads), extractor
