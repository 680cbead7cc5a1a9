"""DRDC's exported model (its base; the diffusion refinement does not export yet), for the torch-free runtime
(:mod:`ddad_infer`). Transformer base, one graph (the runtime's ``graph`` kind):

    model.onnx       image (B, C, H, W) in [-1, 1] -> anomaly map (B, 1, H, W), score (B,), embedding (B, E)

Memory-bank base (the runtime's ``bank`` kind, as PatchCore's export):

    features.onnx    image -> tokens (B, D, grid, grid), embedding (B, E)
    scorer.onnx      grid of nearest-bank distances (B, 1, grid, grid) -> anomaly map, score
    bank-*.npy, recognition.npy, export.json     as :func:`ddad.export.bank_facts`, :func:`ddad.export.write_manifest`

Each map is Eq. 2's base heatmap (multi-scale where the run says), divided by its calibrated maximum where
the run has a refiner (Eq. 17's input scale), the image score its pooled maximum. A run with a refiner
exports only at ``detect.alpha`` 0, where Eq. 17 gives the base map alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...engine.recognition import global_embedding
from ...export import EXPORT_DIR, bank_facts, export_graphs, write_manifest
from ...runs import RunDir
from .detector import base_map, image_score
from .features import tokens_of_stages


class MapGraph(torch.nn.Module):
    """Token-grid error (B, 1, grid, grid) -> (anomaly map, score), as :meth:`DRDCDetector.score_maps` at
    alpha 0."""

    def __init__(self, detect, size: int, max_feature: float | None) -> None:
        super().__init__()
        self.detect, self.size, self.max_feature = detect, (size, size), max_feature

    def forward(self, error: torch.Tensor):
        fused = base_map(error, self.size, self.detect)
        if self.max_feature is not None:
            fused = fused / self.max_feature
        return fused, image_score(fused, self.detect)


class TokenGraph(torch.nn.Module):
    def __init__(self, extractor, grid: int) -> None:
        super().__init__()
        self.extractor, self.grid = extractor, grid

    def forward(self, image: torch.Tensor):
        stages = self.extractor(image)
        return tokens_of_stages(stages, self.grid), global_embedding(stages)


class TransformerGraph(torch.nn.Module):
    def __init__(self, tokens: TokenGraph, model, scorer: MapGraph) -> None:
        super().__init__()
        self.tokens, self.model, self.scorer = tokens, model, scorer

    def forward(self, image: torch.Tensor):
        tokens, embedding = self.tokens(image)
        fused, score = self.scorer(self.model.error(tokens).float())
        return fused, score, embedding


def export_model(loaded, run: RunDir, config, out_dir: Path | None = None, progress: bool = True,
                 fmt: str = "onnx") -> Path:
    """Write the run's loaded DRDC model (:class:`LoadedDetector`) into ``out_dir`` (default RUN_DIR/export)."""
    detector = loaded.detect
    if detector.refiner is not None and config.detect.alpha != 0:
        raise ValueError("DRDC's diffusion refinement does not export yet: export the base model alone with "
                         "--set detect.alpha=0 (run `ddad test` with it first, for its thresholds), or a run "
                         "without refinement")
    if config.detect.precision != "fp32":
        raise ValueError(f"exported graphs compute in fp32; detect.precision is {config.detect.precision}: "
                         "export with --set detect.precision=fp32 (and test with it, for its thresholds)")
    out_dir = Path(out_dir) if out_dir else run.root / EXPORT_DIR
    size, channels, grid = config.data.image_size, config.data.channels, config.features.grid
    detector.extractor.float().cpu().eval()
    detector.model.float().cpu().eval()
    max_feature = None if detector.refiner is None else float(detector.scale.max_feature)
    scorer = MapGraph(config.detect, size, max_feature).eval()
    tokens = TokenGraph(detector.extractor, grid).eval()
    image = torch.zeros(2, channels, size, size)
    facts = {"image_size": size, "channels": channels, "backbone": config.features.backbone,
             "base": config.features.base, "batch_size": config.runtime.batch_size}
    if config.features.base == "bank":
        modules = {"features": (tokens, (image,), ["image"], ["features", "embedding"]),
                   "scorer": (scorer, (torch.ones(2, 1, grid, grid),), ["grid"], ["anomaly_map", "score"])}
        graphs = export_graphs(modules, out_dir, fmt, progress)
        facts.update(bank_facts(loaded, detector.model.banks, run, out_dir, progress))
        return write_manifest(out_dir, run, "drdc", "bank", fmt, loaded.key, graphs, **facts)
    modules = {"model": (TransformerGraph(tokens, detector.model, scorer).eval(), (image,), ["image"],
                         ["anomaly_map", "score", "embedding"])}
    graphs = export_graphs(modules, out_dir, fmt, progress)
    facts.update(bank_facts(loaded, {}, run, out_dir, progress))
    return write_manifest(out_dir, run, "drdc", "graph", fmt, loaded.key, graphs, **facts)
