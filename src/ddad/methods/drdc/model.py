"""DRDC's base model: a transformer that reconstructs frozen backbone features (paper Sec. 3.1, Eq. 1-2;
the UniAD architecture). Written from the papers' description, not from UniAD's code.

    tokens  = Linear(features) + learned 2-D position embedding                 (h*w tokens, hidden width)
    memory  = Encoder(tokens)             self-attention, no token sees its own k x k neighbourhood
    out     = Decoder(memory)             each layer: its own learned queries attend to themselves and to
                                          the previous layer's output, under the same neighbour mask
    f^      = Linear(out)                                                         back to the features' width
    L       = || f^ - f ||^2  (mean)                                              (Eq. 1)
    map     = || f^ - f ||_2 over channels, upsampled to the image                (Eq. 2)

During training only, feature jitter adds to each token Gaussian noise of its norm divided by the channel
count, times ``jitter_scale``, to a batch with probability ``jitter_prob``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...memory_bank import nearest_by_category
from .layers import Dropout, MaskedAttention, additive_mask
from .settings import ReconstructionConfig


def neighbour_mask(grid: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(grid^2, grid^2) bool, True where attention is forbidden: query token i may not attend to token j
    when j lies in the k x k window centred on i (itself included). None for k = 0."""
    if k <= 0:
        return None
    ys, xs = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    r = k // 2
    return ((ys[:, None] - ys[None, :]).abs() <= r) & ((xs[:, None] - xs[None, :]).abs() <= r)


def jitter(features: torch.Tensor, noise: torch.Tensor, scale: float) -> torch.Tensor:
    """Feature jitter: ``features`` (B, C, H, W) plus ``noise`` scaled by each token's norm over channels,
    divided by C, times ``scale``."""
    norms = features.norm(dim=1, keepdim=True) / features.shape[1]
    return features + noise * norms * scale


def _feed_forward(cfg: ReconstructionConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cfg.hidden, cfg.ffn), nn.ReLU(), Dropout(cfg.dropout), nn.Linear(cfg.ffn, cfg.hidden))


def _attention(cfg: ReconstructionConfig) -> MaskedAttention:
    return MaskedAttention(cfg.hidden, cfg.heads, dropout=cfg.attention_dropout_p)


class DecoderLayer(nn.Module):
    """Post-norm decoder layer with its own learned query embedding (one per token)."""

    def __init__(self, tokens: int, cfg: ReconstructionConfig) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(tokens, cfg.hidden) * 0.02)
        self.self_attn, self.cross_attn, self.ffn = _attention(cfg), _attention(cfg), _feed_forward(cfg)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.hidden) for _ in range(3))
        self.dropouts = nn.ModuleList(Dropout(cfg.dropout) for _ in range(3))

    def forward(self, previous: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = self.query.unsqueeze(0).expand(previous.shape[0], -1, -1)
        q_pos = q + pos
        q = self.norms[0](q + self.dropouts[0](self.self_attn(q_pos, q_pos, q, mask)))
        q = self.norms[1](q + self.dropouts[1](self.cross_attn(q + pos, previous + pos, previous, mask)))
        return self.norms[2](q + self.dropouts[2](self.ffn(q)))


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer with ReLU feed-forward."""

    def __init__(self, cfg: ReconstructionConfig) -> None:
        super().__init__()
        self.attn, self.ffn = _attention(cfg), _feed_forward(cfg)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.hidden) for _ in range(2))
        self.dropouts = nn.ModuleList(Dropout(cfg.dropout) for _ in range(2))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x_pos = x + pos
        x = self.norms[0](x + self.dropouts[0](self.attn(x_pos, x_pos, x, mask)))
        return self.norms[1](x + self.dropouts[1](self.ffn(x)))


class FeatureReconstructor(nn.Module):
    """Reconstructs (B, channels, grid, grid) features through the neighbour-masked transformer."""

    def __init__(self, channels: int, grid: int, cfg: ReconstructionConfig) -> None:
        super().__init__()
        self.channels, self.grid, self.cfg = channels, grid, cfg
        tokens = grid * grid
        self.project_in = nn.Linear(channels, cfg.hidden)
        self.pos = nn.Parameter(torch.randn(1, tokens, cfg.hidden) * 0.02)  # learned 2-D position embedding
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(tokens, cfg) for _ in range(cfg.decoder_layers))
        self.project_out = nn.Linear(cfg.hidden, channels)
        mask = neighbour_mask(grid, cfg.neighbour)
        if mask is not None and bool(mask.all(dim=1).any()):
            raise ValueError(f"a {cfg.neighbour} x {cfg.neighbour} neighbour mask hides every token of a {grid} x "
                             f"{grid} grid; use a smaller model.neighbour")
        self.register_buffer("mask", additive_mask(mask), persistent=False)  # 0 or -inf, added to the logits

    def forward(self, features: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``noise``: the jitter noise (training only; None in evaluation, where nothing is random)."""
        b, c, h, w = features.shape
        if (c, h, w) != (self.channels, self.grid, self.grid):
            raise ValueError(f"features must be (B, {self.channels}, {self.grid}, {self.grid}), got {tuple(features.shape)}")
        if noise is not None and self.training:
            features = jitter(features, noise, self.cfg.jitter_scale)
        x = self.project_in(features.flatten(2).transpose(1, 2))
        for layer in self.encoder:
            x = layer(x, self.pos, self.mask)
        out = x
        for layer in self.decoder:
            out = layer(out, self.pos, self.mask)
        return self.project_out(out).transpose(1, 2).reshape(b, c, h, w)

    def error(self, features: torch.Tensor, categories: Sequence[str | None] | None = None) -> torch.Tensor:
        """(B, 1, grid, grid): Eq. 2 on the token grid, the L2 norm over channels of the reconstruction error
        (one model for every category: ``categories`` changes nothing)."""
        return (self(features).float() - features.float()).norm(dim=1, keepdim=True)


class TokenBank(nn.Module):
    """The memory-bank base: each token's distance to the nearest training token of its image's bank (one
    for all categories, or one per category: :func:`ddad.memory_bank.banks_for`), (B, 1, grid, grid) like
    :meth:`FeatureReconstructor.error`. Nothing in it is trained."""

    def __init__(self, banks: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(banks)
        for i, bank in enumerate(banks.values()):
            self.register_buffer(f"bank{i}", bank.float(), persistent=False)

    @property
    def banks(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"bank{i}") for i, name in enumerate(self.names)}

    def error(self, features: torch.Tensor, categories: Sequence[str | None] | None = None) -> torch.Tensor:
        return nearest_by_category(features, self.banks, categories)


def base_heatmap(error: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Eq. 2's map: the base model's error on the token grid (B, 1, grid, grid) upsampled (bilinear) to
    ``size``."""
    return F.interpolate(error.float(), size=size, mode="bilinear", align_corners=False)


def pooled_max(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """Image score: the maximum of the maps after a pool x pool average pooling with stride 1."""
    k = min(pool, maps.shape[-1], maps.shape[-2])
    return F.avg_pool2d(maps, k, stride=1).flatten(1).amax(dim=1)


class FeatureReconstructionObjective:
    """What the engine trains DRDC's base model with: per batch, a jitter coin and noise (drawn even when
    unused, so resumption replays them exactly), then the mean squared error of Eq. 1."""

    def __init__(self, cfg: ReconstructionConfig) -> None:
        self.cfg = cfg

    def draw(self, n: int, sample_shape, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        coin = torch.rand((), generator=generator)
        noise = torch.randn((n, *sample_shape), generator=generator)
        return coin, noise

    def loss(self, model: nn.Module, x0: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        coin, noise = draws
        jittered = bool(coin < self.cfg.jitter_prob) and self.cfg.jitter_scale > 0
        return F.mse_loss(model(x0, noise if jittered else None).float(), x0.float())
