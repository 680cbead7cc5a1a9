"""Exported graphs, for any method: write a network as an ONNX graph (torch.onnx, dynamo exporter, dynamic
batch), and run denoiser and feature-extractor graphs in ONNX Runtime behind the same call signatures
as the PyTorch modules, so a method's detector runs unchanged on either. What a method exports is its own
(``ddad.methods.ddad.graphs``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch



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


