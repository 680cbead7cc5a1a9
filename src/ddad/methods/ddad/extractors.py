"""DDAD's feature extractor phi (Eq. 8): the pretrained backbone, or the run's domain-adapted one (Eq. 10).

    RUN_DIR/adapted/epoch-NNN.safetensors   the adapted extractor after each adaptation epoch (resumable)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...backbones import FeatureExtractor, create_backbone
from ...checkpoint import Checkpoint
from ...runs import RunDir
from ...runtime import RuntimeConfig
from .settings import DDADWeights, DetectConfig


def adapted_dir(run: RunDir):
    return run.root / "adapted"


def adapted_checkpoints(run: RunDir) -> list[tuple[int, Path]]:
    folder = adapted_dir(run)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob("epoch-*.safetensors"):
        try:
            found.append((int(p.stem.split("-")[1]), p))
        except (IndexError, ValueError):
            continue
    return sorted(found)


def adapted_checkpoint(run: RunDir, epoch: int | None = None) -> Path | None:
    """The file of the run's adapted extractor (latest epoch, or ``epoch``), None when the run has none."""
    found = dict(adapted_checkpoints(run))
    if not found:
        if epoch is not None:
            raise FileNotFoundError(f"run {run.root} has no adapted extractor (run ddad adapt first)")
        return None
    chosen = epoch if epoch is not None else max(found)
    if chosen not in found:
        raise FileNotFoundError(f"run {run.root} has no adapted extractor of epoch {chosen}; "
                                f"available: {sorted(found)}")
    return found[chosen]


def load_adapted_extractor(path: Path, backbone: str, layers: Sequence[int]) -> FeatureExtractor:
    """The adapted extractor stored in ``path`` (see :func:`adapted_checkpoint`)."""
    ckpt = Checkpoint(path)
    if ckpt.info.get("backbone") != backbone:
        raise ValueError(f"{path} adapts {ckpt.info.get('backbone')!r}, but detection asks for {backbone!r}")
    ext = create_backbone(backbone, layers, weights="random")
    state = ckpt.state_dict("extractor")
    own = ext.state_dict()
    ext.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    return ext.eval()


def load_extractor(run: RunDir, detect: DetectConfig, weights: DDADWeights, runtime: RuntimeConfig
                   ) -> tuple[FeatureExtractor | None, Path | None]:
    """(phi, the adapted file it came from or None for the pretrained backbone); (None, None) for
    pixel-only scoring."""
    if not detect.scoring.uses_features:
        return None, None
    adapted_file = adapted_checkpoint(run, weights.adapted_epoch) if weights.adapted else None
    if adapted_file is not None:
        return load_adapted_extractor(adapted_file, detect.backbone, detect.scoring.feature_layers), adapted_file
    return create_backbone(detect.backbone, detect.scoring.feature_layers, weights.backbone_weights,
                           runtime.allow_download), None
