"""DRDC's exported model, for the torch-free runtime (:mod:`ddad_infer`). Transformer base, one graph (the
runtime's ``graph`` kind):

    model.onnx       image (B, C, H, W) in [-1, 1] -> anomaly map (B, 1, H, W), score (B,), embedding (B, E)

Memory-bank base (the runtime's ``bank`` kind, as PatchCore's export):

    features.onnx    image -> tokens (B, D, grid, grid), embedding (B, E)
    scorer.onnx      grid of nearest-bank distances (B, 1, grid, grid) -> anomaly map, score
    bank-*.npy, recognition.npy, export.json     as :func:`ddad.export.bank_facts`, :func:`ddad.export.write_manifest`

Each map is Eq. 2's base heatmap (multi-scale where the run says), divided by its calibrated maximum where
the run has a refiner (Eq. 17's input scale), the image score its pooled maximum. With a refiner at
``detect.alpha`` > 0, the refinement's graphs too (at alpha 0 Eq. 17 is the base map alone: none):

    refine_input.onnx  image (B, C, H, W) -> x (B, C, r, r): the image at the refinement's size
    refine_unet.onnx   x_t, t (, condition c) -> eps: the inpainting UNet (Eq. 10)
    refine_map.onnx    x, predictions (B, S, K, C, r, r), inpainted (B, C, r, r), base map (B, 1, H, W)
                       -> anomaly map (Eq. 14-17), score, reconstruction (B, C, H, W)

and the manifest's ``refinement``: cells, sets, steps, seed and schedule of the inpainting loop, which the
runtime runs in numpy (:mod:`ddad_infer.inpainting`) with every image's own draws.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ...engine.recognition import global_embedding
from ...export import EXPORT_DIR, bank_facts, export_graphs, write_manifest
from ...runs import RunDir
from .detector import base_map, image_score
from .features import tokens_of_stages
from .fusion import fuse
from .refiner import diffusion_heatmap, resized


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


class RefineInputGraph(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor):
        return resized(image, self.size)


class RefineMapGraph(torch.nn.Module):
    """The refinement's predictions and the (scaled) base map -> fused map, score and reconstruction, as
    :meth:`DRDCDetector.maps` and :meth:`DRDCDetector.score_maps` make them (Eq. 14-17)."""

    def __init__(self, detect, size: int, max_pixel: float) -> None:
        super().__init__()
        self.detect, self.size, self.max_pixel = detect, size, max_pixel

    def forward(self, x: torch.Tensor, predictions: torch.Tensor, inpainted: torch.Tensor, base: torch.Tensor):
        heatmap = diffusion_heatmap(x, predictions, self.detect)
        diffusion = F.interpolate(heatmap, size=(self.size, self.size), mode="bilinear", align_corners=False)
        fused = fuse(base, diffusion / self.max_pixel, self.detect.alpha)  # Eq. 17
        return fused, image_score(fused, self.detect), resized(inpainted, self.size).clamp(-1, 1)


def refinement_graphs(refiner, config, size: int, max_pixel: float) -> tuple[dict, dict]:
    """(the refinement's graph modules for :func:`export_graphs`, its manifest entry)."""
    refine, detect, channels = config.refine, config.detect, config.data.channels
    r, specs, k = refine.image_size, len(refine.cells), (len(refiner.steps) if detect.fusion else 1)
    x = torch.rand(2, channels, r, r) * 2 - 1
    unet = refiner.unet.float().cpu().eval()
    t = torch.tensor([250, 25], dtype=torch.long)
    unet_args, unet_inputs = ((x, t, torch.rand_like(x)), ["x", "t", "cond"]) if refine.model_conditioning \
        else ((x, t), ["x", "t"])
    modules = {
        "refine_input": (RefineInputGraph(r).eval(), (torch.rand(2, channels, size, size),), ["image"], ["x"]),
        "refine_unet": (unet, unet_args, unet_inputs, ["eps"]),
        "refine_map": (RefineMapGraph(detect, size, max_pixel).eval(),
                       (x, torch.rand(2, specs, k, channels, r, r), torch.rand_like(x), torch.rand(2, 1, size, size)),
                       ["x", "predictions", "inpainted", "base"], ["anomaly_map", "score", "reconstruction"])}
    entry = {"image_size": r, "cells": list(refine.cells), "sets": refine.sets,
             "steps": [list(step) for step in refiner.steps], "seed": detect.seed,
             "alphas_cumprod": refiner.table.double().tolist(), "model_conditioning": refine.model_conditioning,
             "test_time_conditioning": detect.test_time_conditioning, "fusion": detect.fusion}
    return modules, entry


def export_model(loaded, run: RunDir, config, out_dir: Path | None = None, progress: bool = True,
                 fmt: str = "onnx") -> Path:
    """Write the run's loaded DRDC model (:class:`LoadedDetector`) into ``out_dir`` (default RUN_DIR/export)."""
    detector = loaded.detect
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
             "base": config.features.base, "batch_size": config.runtime.batch_size, "refinement": None}
    if config.features.base == "bank":
        kind, banks = "bank", detector.model.banks
        modules = {"features": (tokens, (image,), ["image"], ["features", "embedding"]),
                   "scorer": (scorer, (torch.ones(2, 1, grid, grid),), ["grid"], ["anomaly_map", "score"])}
    else:
        kind, banks = "graph", {}
        modules = {"model": (TransformerGraph(tokens, detector.model, scorer).eval(), (image,), ["image"],
                             ["anomaly_map", "score", "embedding"])}
    if detector.refiner is not None and config.detect.alpha > 0:  # at alpha 0 Eq. 17 is the base map alone
        refinement, facts["refinement"] = refinement_graphs(detector.refiner, config, size,
                                                            float(detector.scale.max_pixel))
        modules.update(refinement)
    graphs = export_graphs(modules, out_dir, fmt, progress)
    facts.update(bank_facts(loaded, banks, run, out_dir, progress))
    return write_manifest(out_dir, run, "drdc", kind, fmt, loaded.key, graphs, **facts)
