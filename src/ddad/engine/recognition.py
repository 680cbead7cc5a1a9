"""Which category an image shows, for a model of several categories when the caller does not say.

The nearest category by a global feature: each image's embedding is the spatial mean of the run's own
backbone stages (the features the method already uses), L2-normalised; the category is that of the
nearest reference (cosine) among up to :data:`REFERENCES_PER_CATEGORY` defect-free training images of each
category, chosen in a seeded order. The references are stored in the run once computed:

    RUN_DIR/recognition/references-<key>.safetensors   embeddings, with the categories as metadata

``ddad test`` reports the recognition's accuracy on the test split (whose categories are known) in
metrics.json; ``ddad predict`` uses it for images whose category is neither given nor in their path.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import atomic_write
from ..data.formats import build_index
from ..data.splits import readable_batches
from ..runs import RunDir

REFERENCES_PER_CATEGORY = 64
Embed = Callable[[torch.Tensor], torch.Tensor]  # images (B, C, H, W) in [-1, 1] -> (B, D)


def global_embedding(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, D): each stage's spatial mean, concatenated, L2-normalised."""
    pooled = torch.cat([f.float().mean(dim=(-2, -1)) for f in features], dim=1)
    return F.normalize(pooled, dim=1)


def backbone_embed(extractor: torch.nn.Module, device: torch.device | str) -> Embed:
    """The :func:`global_embedding` of ``extractor``'s stages (a frozen backbone, on ``device``)."""
    return lambda images: global_embedding(extractor(images.to(device)))


class CategoryRecogniser:
    """1-nearest-neighbour over reference embeddings (cosine): ``recognise(images)`` -> category names."""

    def __init__(self, embed: Embed, references: torch.Tensor, labels: Sequence[str], batch_size: int = 32) -> None:
        if len(references) != len(labels) or not len(labels):
            raise ValueError("a category recogniser needs one label per reference embedding, and some references")
        self.embed, self.references, self.labels = embed, F.normalize(references.float(), dim=1), list(labels)
        self.batch_size = batch_size

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(self.labels))

    def nearest(self, embeddings: torch.Tensor) -> list[str]:
        similarity = F.normalize(embeddings.float(), dim=1) @ self.references.T
        return [self.labels[i] for i in similarity.argmax(dim=1).tolist()]

    def __call__(self, images: torch.Tensor) -> list[str]:
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            with torch.inference_mode():
                out += self.nearest(self.embed(images[start:start + self.batch_size]).cpu())
        return out


def reference_samples(index, per_category: int = REFERENCES_PER_CATEGORY, seed: int = 0) -> list:
    """Up to ``per_category`` training samples of each category of ``index``, in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for category in index.categories:
        samples = [s for s in index.train if s.category == category]
        order = torch.randperm(len(samples), generator=generator).tolist()
        chosen += [samples[i] for i in order[:per_category]]
    return chosen


def build_recogniser(run: RunDir, data, embed: Embed, identity: list, batch_size: int = 32,
                     progress: bool = True) -> CategoryRecogniser | None:
    """The run's recogniser: None for a run of one category. ``identity``: what the embedding depends on
    (the backbone's name and weights file), the key of the stored references."""
    index = build_index(data)
    if len(index.categories) < 2:
        return None
    key = hashlib.sha256(json.dumps([identity, data.to_dict(), REFERENCES_PER_CATEGORY], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    path = run.root / "recognition" / f"references-{key}.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            return CategoryRecogniser(embed, f.get_tensor("embeddings"), json.loads(f.metadata()["categories"]),
                                      batch_size)
    embeddings, labels = [], []
    for images, samples in readable_batches(reference_samples(index), data, batch_size, progress,
                                            "category references"):
        with torch.inference_mode():
            embeddings.append(embed(images).cpu())
        labels += [s.category for s in samples]
    references = torch.cat(embeddings)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"embeddings": references.contiguous()}, tmp,
                                             metadata={"categories": json.dumps(labels)}))
    return CategoryRecogniser(embed, references, labels, batch_size)
