"""DDAD's exported model: a self-contained folder that scores exactly like the run, for the torch-free
runtime (:mod:`ddad_infer`: ``ddad-infer FOLDER IMAGES``) and for ``--backend onnxruntime``.

    unet.onnx       x (B, C, H, W) float32, t (B,) int64 -> eps (B, C, H, W): the noise predictor of Alg. 1
    scorer.onnx     image y, reconstruction x0 (B, C, H, W) -> anomaly map (B, 1, H, W), score (B,): Eq. 8-9,
                    the Gaussian, the crop and the maximum, with the run's calibrated maxima baked in
    extractor.onnx  image (B, C, H, W) in [-1, 1] -> one output per scoring stage (``--backend onnxruntime``)
    *.xml, *.bin    the same graphs as OpenVINO IR (``--format openvino``; the ONNX files stay beside them)
    export.json     the manifest: settings of the sampler, the schedule's alphas_cumprod, the run's
                    calibration key and the decisions chosen under it (thresholds, normalisation), and
                    each graph file's SHA-256 (graphs.NAME.onnx, graphs.NAME.openvino)

The sampling loop stays outside the graphs (numpy in the runtime, Python in ddad): a few tensor operations
per step around the network call, with every image's own seeded noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...export import EXPORT_DIR, ExtractorGraph, OnnxDenoiser, OnnxExtractor, export_graphs, require_onnx, write_manifest
from ...runs import RunDir
from ...scoring import anomaly_map, feature_distance, image_scores, pixel_distance, resize_for_features
from .settings import DetectConfig


class ScorerGraph(torch.nn.Module):
    """Eq. 8-9 as one exportable module: (y, x0) -> (anomaly map, image score), with the detector's
    extractor, scoring settings and calibrated maxima (the same functions as :meth:`Detector.score`)."""

    def __init__(self, detector) -> None:
        super().__init__()
        self.config, self.scale, self.crop = detector.config.scoring, detector.score_scale, detector.config.crop
        self.extractor = detector.extractor

    def forward(self, y: torch.Tensor, x0: torch.Tensor):
        d_p, d_f = pixel_distance(x0, y), None
        if self.extractor is not None:
            feats = self.extractor(resize_for_features(torch.cat([x0, y]), self.config.feature_size),
                                   self.config.feature_layers)
            n = y.shape[0]
            d_f = feature_distance([f[:n] for f in feats], [f[n:] for f in feats], tuple(y.shape[-2:]),
                                   self.config.patch_size)
        maps = anomaly_map(d_p, d_f, self.config, self.scale)
        return maps, image_scores(maps, self.crop)


def export_model(detector, run: RunDir, config, out_dir: Path | None = None, progress: bool = True,
                 fmt: str = "onnx", key=None) -> Path:
    """Write the exported model of ``detector`` (the run's, in PyTorch, calibrated) into ``out_dir`` (default
    RUN_DIR/export) in ``fmt`` (onnx or openvino), with its manifest; ``key``: the detector's calibration key
    (the decisions chosen under it go into the manifest)."""
    from ...diffusion.schedule import alphas_cumprod

    if config.detect.scoring.uses_features and config.detect.scoring.reference == "bank":
        raise ValueError("an exported DDAD model scores against the reconstruction's features; "
                         "detect.scoring.reference 'bank' is not exported yet")
    if config.detect.scoring.needs_calibration and detector.score_scale is None:
        raise ValueError("the detector must be calibrated (Eq. 9's maxima) before its scorer is exported")
    out_dir = Path(out_dir) if out_dir else run.root / EXPORT_DIR
    size, channels = config.data.image_size, config.data.channels
    x = torch.zeros(2, channels, size, size)
    modules = {"unet": (detector.unet.float().cpu().eval(), (x, torch.tensor([250, 25], dtype=torch.long)),
                        ["x", "t"], ["eps"]),
               # two distinct example tensors: the exporter treats one tensor passed twice as one input (x0 - y == 0)
               "scorer": (ScorerGraph(detector).eval(), (x, torch.full_like(x, 0.5)), ["y", "x0"],
                          ["anomaly_map", "score"])}
    extractor = None
    if detector.extractor is not None:
        detector.extractor.float().cpu().eval()
        layers = config.detect.scoring.feature_layers
        modules["extractor"] = (ExtractorGraph(detector.extractor, layers), (x,), ["image"],
                                [f"stage{j}" for j in layers])
        extractor = {"backbone": config.detect.backbone, "layers": list(layers),
                     "adapted": detector.extractor_source == "adapted"}
    graphs = export_graphs(modules, out_dir, fmt, progress)
    sampler = config.detect.sampler
    return write_manifest(
        out_dir, run, "ddad", "diffusion", fmt, key, graphs,
        checkpoint=str(run.resolve_checkpoint(config.weights.checkpoint).resolve()),
        weights=config.weights.average, image_size=size, channels=channels, extractor=extractor,
        sampler={"start_step": sampler.start_step, "skip": sampler.skip, "w": sampler.w, "eta": sampler.eta,
                 "authors_first_step": sampler.authors_first_step},
        seed=config.detect.seed, alphas_cumprod=alphas_cumprod(config.schedule).float().tolist(),
        batch_size=config.runtime.batch_size)


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
