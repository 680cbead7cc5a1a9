"""PatchCore's exported model, for the torch-free runtime (:mod:`ddad_infer`):

    features.onnx    image (B, C, H, W) in [-1, 1] -> patch features (B, D, h, w) (Sec. 3.1), and the image's
                     global embedding (B, E) that recognises its category (``ddad.engine.recognition``)
    scorer.onnx      grid (B, 1, h, w) of nearest-bank distances -> anomaly map (B, 1, H, W), score (B,)
    bank-*.npy       each memory bank (M, D) float32 (the manifest's ``banks`` name their categories)
    recognition.npy  a run of several categories: the reference embeddings (R, E), labels in the manifest
    export.json      the manifest (``ddad.export.write_manifest``)

The nearest-neighbour searches stay outside the graphs (numpy in the runtime: exact, any bank size, the
images of one category against their bank), as they stay functions apart in ddad.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...engine.recognition import global_embedding
from ...export import EXPORT_DIR, bank_facts, export_graphs, write_manifest
from ...runs import RunDir
from ...scoring import resize_for_features
from .model import compute_patch_features, distance_map, features_of_stages


class FeatureGraph(torch.nn.Module):
    def __init__(self, detector) -> None:
        super().__init__()
        self.extractor, self.features = detector.extractor, detector.features

    def forward(self, image: torch.Tensor):
        x = resize_for_features(image, self.features.input_size)
        stages = self.extractor(x, self.features.layers)
        whole = stages if x is image else self.extractor(image, self.features.layers)  # the embedding's input
        return features_of_stages(stages, self.features), global_embedding(whole)


class MapGraph(torch.nn.Module):
    def __init__(self, detect, size: int) -> None:
        super().__init__()
        self.detect, self.size = detect, (size, size)

    def forward(self, grid: torch.Tensor):
        return distance_map(grid, self.size, self.detect)


def export_model(loaded, run: RunDir, config, out_dir: Path | None = None, progress: bool = True,
                 fmt: str = "onnx") -> Path:
    """Write the run's loaded PatchCore model (:class:`LoadedDetector`: banks, categories, recognition) into
    ``out_dir`` (default RUN_DIR/export)."""
    detector = loaded.detect
    out_dir = Path(out_dir) if out_dir else run.root / EXPORT_DIR
    size, channels = config.data.image_size, config.data.channels
    detector.extractor.float().cpu().eval()
    image = torch.zeros(2, channels, size, size)
    with torch.no_grad():
        grid = torch.ones_like(compute_patch_features(detector.extractor, image, detector.features)[:, :1])
    graphs = export_graphs({"features": (FeatureGraph(detector).eval(), (image,), ["image"], ["features", "embedding"]),
                            "scorer": (MapGraph(detector.detect, size).eval(), (grid,), ["grid"],
                                       ["anomaly_map", "score"])}, out_dir, fmt, progress)
    return write_manifest(out_dir, run, "patchcore", "bank", fmt, loaded.key, graphs, image_size=size,
                          channels=channels, backbone=config.features.backbone, batch_size=config.runtime.batch_size,
                          **bank_facts(loaded, detector.banks, run, out_dir, progress))
