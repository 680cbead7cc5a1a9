"""DRDC's input: the frozen backbone's stages, each resized (bilinear) to the token grid and concatenated
on channels (UniAD: EfficientNet-b4 at strides 2/4/8/16 -> 14 x 14, 272 channels).

The backbone is frozen and training uses no augmentation, so the training images' features are computed
once and kept with the run (``RUN_DIR/cache/features-<key>.safetensors``, the key covering the backbone,
its weights file, the stages, the grid, the data settings and the image list): training then costs only
the transformer. Detection computes the same features the same way.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ...backbones import FeatureExtractor, create_backbone, resolve_weights
from ...checkpoint import atomic_write
from ...config import to_plain
from ...engine.calibration import file_id
from ...engine.distributed import context
from ...engine.trainer import as_float_images
from ...runs import RunDir, WeightsConfig
from ...runtime import RuntimeConfig
from .settings import FeatureConfig


def build_extractor(features: FeatureConfig, weights: WeightsConfig, runtime: RuntimeConfig) -> FeatureExtractor:
    return create_backbone(features.backbone, tuple(range(1, len(features.strides) + 1)), weights.backbone_weights,
                           runtime.allow_download, strides=features.strides)


def feature_channels(extractor: FeatureExtractor) -> int:
    return sum(info["channels"] for info in extractor.feature_info)


def tokens_of_stages(stages, grid: int) -> torch.Tensor:
    """(B, sum of stage channels, grid, grid): the backbone's ``stages`` resized to the grid, concatenated."""
    return torch.cat([F.interpolate(s.float(), size=(grid, grid), mode="bilinear", align_corners=False)
                      for s in stages], dim=1)


@torch.inference_mode()
def token_features(extractor: FeatureExtractor, images: torch.Tensor, grid: int) -> torch.Tensor:
    """:func:`tokens_of_stages` of every stage of ``extractor``."""
    return tokens_of_stages(extractor(as_float_images(images)), grid)


def features_in_batches(extractor: FeatureExtractor, images: torch.Tensor, grid: int, batch_size: int,
                        device: torch.device, progress: bool = True) -> torch.Tensor:
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch", disable=not progress,
                      leave=False):
        out.append(token_features(extractor, images[start:start + batch_size].to(device), grid).cpu())
    return torch.cat(out)


def cache_key(features: FeatureConfig, weights: WeightsConfig, data, samples: Sequence) -> str:
    path = resolve_weights(features.backbone, weights.backbone_weights) if weights.backbone_weights != "random" \
        else None
    key = {"features": to_plain(features), "weights": file_id(path) if path is not None else "random",
           "data": to_plain(data), "images": [str(s.image) for s in samples]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cached_features(run: RunDir, key: str, compute) -> torch.Tensor:
    """The features stored under ``key`` in the run, else ``compute()``'s, stored there (atomically)."""
    path = run.root / "cache" / f"features-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    feats = compute()
    if context().is_main:  # under torchrun every rank computes them, rank 0 keeps them
        atomic_write(path, lambda tmp: save_file({"features": feats.contiguous()}, tmp))
    return feats
