"""Export for deployment: the UNet step and the feature extractor as ONNX graphs, and an ONNX Runtime
backend that the detector uses in place of the PyTorch modules.

The sampling loop (Algorithm 1) stays in Python: it is a few tensor operations per step around the
network call, and keeping it there keeps per-image seeded noise and every sampler setting available.

    RUN_DIR/export/unet.onnx        inputs x (B, C, H, W) float32, t (B,) int64 -> eps (B, C, H, W)
    RUN_DIR/export/extractor.onnx   input image (B, C, H, W) in [-1, 1] -> one output per scoring stage
    RUN_DIR/export/export.json      which run, checkpoint, backbone and stages they came from
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint import atomic_write_text
from .runs import RunDir


def _require_onnx():
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise RuntimeError("ONNX support needs onnx, onnxscript and onnxruntime: pip install 'ddad[onnx]'") from None


class _ExtractorGraph(torch.nn.Module):
    def __init__(self, extractor, layers: Sequence[int]) -> None:
        super().__init__()
        self.extractor = extractor
        self.layers = tuple(layers)

    def forward(self, x: torch.Tensor):
        return tuple(self.extractor(x, self.layers))


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str]) -> None:
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


def export_onnx(run: RunDir, out_dir: Path | None = None, detect=None) -> Path:
    """Write unet.onnx (and extractor.onnx unless scoring is pixel-only) for ``run``."""
    _require_onnx()
    from .evaluation import load_detector

    detector, config = load_detector(run, detect, calibrate=False)
    out_dir = Path(out_dir) if out_dir else run.root / "export"
    size, channels = config.data.image_size, config.data.channels
    unet = detector.unet.float().cpu().eval()
    x = torch.zeros(2, channels, size, size)
    t = torch.tensor([250, 25], dtype=torch.long)
    _export(unet, (x, t), out_dir / "unet.onnx", ["x", "t"], ["eps"])
    info = {"run": str(run.root), "checkpoint": str(run.resolve_checkpoint(detector.config.checkpoint)),
            "weights": detector.config.weights, "image_size": size,
            "channels": channels, "extractor": None}
    if detector.extractor is not None:
        layers = detector.config.scoring.feature_layers
        graph = _ExtractorGraph(detector.extractor.float().cpu().eval(), layers)
        _export(graph, (x,), out_dir / "extractor.onnx", ["image"], [f"stage{j}" for j in layers])
        info["extractor"] = {"backbone": detector.config.backbone, "layers": list(layers),
                             "adapted": bool(detector.config.adapted and _adapted(run))}
    atomic_write_text(out_dir / "export.json", json.dumps(info, indent=2))
    return out_dir


def _adapted(run: RunDir) -> bool:
    from .adaptation import adapted_checkpoints

    return bool(adapted_checkpoints(run))


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


def onnx_detector(run: RunDir, detect=None, threads: int | None = None):
    """A :class:`Detector` whose network calls run in ONNX Runtime (from RUN_DIR/export)."""
    _require_onnx()
    from .detection import Detector

    config = run.load_config()
    detect = detect or config.detect
    folder = run.root / "export"
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
    return Detector(OnnxDenoiser(folder / "unet.onnx", threads), detect, config.schedule, extractor=extractor,
                    device="cpu"), config
