"""The guided-diffusion UNet that DDAD uses as its denoiser epsilon_theta(x_t, t).

Architecture (DDAD paper Sec. 5.2; Dhariwal & Nichol 2021): a UNet of residual blocks with a
sinusoidal time embedding, multi-head self-attention at chosen feature resolutions, and BigGAN-style
residual blocks for down- and up-sampling. The module and parameter names follow the authors'
published checkpoints exactly (``time_embedding``, ``down``, ``middle``, ``up``, ``out``; residual
blocks with ``in_layers`` / ``embed_layers`` / ``out_layers`` / ``skip_connection``; attention with
``norm`` / ``to_qkv`` / ``proj_out``), so their ``state_dict`` loads with :func:`load_official_state_dict`.

Presets: :meth:`UNetConfig.ddad` (base 64, 4 heads, 32,952,707 parameters at 256 x 256 RGB) and
:meth:`UNetConfig.ddad_s` (base 32, 2 heads, dropout 0.3, 8,257,731 parameters).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

# Channel multipliers of the authors' code for each supported image size.
DEFAULT_CHANNEL_MULTS: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    224: (1, 1, 2, 2, 4, 4),  # DRDC's 224 px: 256's levels (224 / 32 = 7 at the bottom)
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 3, 4),
}


def _attention_at(image_size: int) -> tuple[int, ...]:
    """The authors' attention resolutions (32, 16, 8); at 224 px the same levels (strides 8, 16, 32)."""
    return (28, 14, 7) if image_size == 224 else (32, 16, 8)


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the denoising UNet. ``channel_mults=None`` takes the authors' default for the size."""

    image_size: int = 256
    in_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[float, ...] | None = None
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 4
    dropout: float = 0.0
    # channels of an image condition concatenated to x_t at the input (DRDC's model conditioning, Eq. 10)
    cond_channels: int = 0

    def __post_init__(self) -> None:
        if self.channel_mults is None and self.image_size not in DEFAULT_CHANNEL_MULTS:
            raise ValueError(
                f"image_size={self.image_size} has no default channel_mults; supported sizes are "
                f"{sorted(DEFAULT_CHANNEL_MULTS)}, or pass channel_mults explicitly"
            )
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {self.cond_channels}")
        if self.base_channels % 32:
            raise ValueError(f"base_channels must be a multiple of 32 (GroupNorm(32)), got {self.base_channels}")
        mults = self.resolved_channel_mults
        odd = [m for m in mults if int(self.base_channels * m) % 32]
        if odd:
            raise ValueError(f"base_channels={self.base_channels} x channel_mults {odd} is not a multiple of 32 "
                             f"(GroupNorm(32)); use a larger base_channels")
        if self.image_size % 2 ** (len(mults) - 1):
            raise ValueError(f"image_size={self.image_size} is not divisible by 2**{len(mults) - 1}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def resolved_channel_mults(self) -> tuple[float, ...]:
        if self.channel_mults is not None:
            return tuple(self.channel_mults)
        return DEFAULT_CHANNEL_MULTS[self.image_size]

    @classmethod
    def ddad(cls, image_size: int = 256, in_channels: int = 3) -> "UNetConfig":
        """The paper's DDAD denoiser: base 64 channels, 4 attention heads, no dropout."""
        return cls(image_size=image_size, in_channels=in_channels, base_channels=64, num_heads=4, dropout=0.0,
                   attention_resolutions=_attention_at(image_size))

    @classmethod
    def ddad_s(cls, image_size: int = 256, in_channels: int = 3) -> "UNetConfig":
        """The paper's compact DDAD-S denoiser: base 32 channels, 2 heads, dropout 0.3."""
        return cls(image_size=image_size, in_channels=in_channels, base_channels=32, num_heads=2, dropout=0.3,
                   attention_resolutions=_attention_at(image_size))

    @classmethod
    def compact(cls, image_size: int = 64, in_channels: int = 3) -> "UNetConfig":
        """ddad's UNet for small images on small budgets: DDAD-S's widths, one residual block per level,
        attention only at the coarsest level, no dropout (2x faster training steps than DDAD-S at 64 px)."""
        coarsest = image_size // 2 ** (len(DEFAULT_CHANNEL_MULTS.get(image_size, (1, 2, 3, 4))) - 1)
        return cls(image_size=image_size, in_channels=in_channels, base_channels=32, num_res_blocks=1,
                   attention_resolutions=(coarsest,), num_heads=2, dropout=0.0)

    @classmethod
    def tiny(cls, image_size: int = 32, in_channels: int = 3) -> "UNetConfig":
        """A small UNet (about 1.3M parameters) for tests, demos and CPU experiments."""
        return cls(image_size=image_size, in_channels=in_channels, base_channels=32, channel_mults=(1, 2, 2),
                   num_res_blocks=1, attention_resolutions=(image_size // 4,), num_heads=2, dropout=0.0)

    @classmethod
    def preset(cls, name: str, image_size: int = 256, in_channels: int = 3) -> "UNetConfig":
        factories = {"ddad": cls.ddad, "ddad-s": cls.ddad_s, "compact": cls.compact, "tiny": cls.tiny}
        if name not in factories:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(factories)}")
        return factories[name](image_size=image_size, in_channels=in_channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults) if self.channel_mults is not None else None
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "UNetConfig":
        d = dict(d)
        if d.get("channel_mults") is not None:
            d["channel_mults"] = tuple(d["channel_mults"])
        if "attention_resolutions" in d:
            d["attention_resolutions"] = tuple(d["attention_resolutions"])
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [sin(t * f_k), cos(t * f_k)],
    f_k = 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1 (Vaswani et al.; DDPM)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / half))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError("time embedding size must be even")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) evaluated in float32 whatever the autocast dtype, as guided diffusion does."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).to(x.dtype)


class ResBlock(nn.Module):
    """Residual block with additive time conditioning; ``down``/``up`` make it the BigGAN-style
    resampling block (average-pool / nearest-upsample between the first norm-activation and conv)."""

    def __init__(
        self,
        in_channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        down: bool = False,
        up: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_layers = nn.Sequential(
            GroupNorm32(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.down, self.up = down, up
        self.embed_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        if out_channels == in_channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.down or self.up:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self._resample(h))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        h = h + self.embed_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, via scaled_dot_product_attention."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.to_qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        flat = x.reshape(b, c, hgt * wid)
        qkv = self.to_qkv(self.norm(flat))  # (B, 3C, L)
        # The authors' (guided diffusion's "legacy") layout: channels are grouped by head first, and
        # each head's block holds its q, k and v in turn: (B, H, 3 * C/H, L).
        head_dim = c // self.num_heads
        qkv = qkv.reshape(b, self.num_heads, 3 * head_dim, hgt * wid).transpose(-1, -2)
        # Contiguous q, k, v let SDPA use its fused (flash) CPU kernel: 2.6x faster in training and
        # 5.8x in inference at 32 x 32 tokens than the strided views.
        q, k, v = (z.contiguous() for z in qkv.split(head_dim, dim=-1))  # each (B, H, L, C/H)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, hgt * wid)
        return (flat + self.proj_out(h)).reshape(b, c, hgt, wid)


class EmbedSequential(nn.Sequential):
    """A sequence of blocks; residual blocks also receive the time embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class UNet(nn.Module):
    """epsilon_theta(x_t, t): predicts the noise in x_t at integer timestep t (0 <= t < T)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        base = config.base_channels
        emb_dim = 4 * base
        mults = config.resolved_channel_mults
        attention_at = set(config.attention_resolutions)

        self.time_embedding = nn.Sequential(
            SinusoidalEmbedding(base), nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        ch = int(base * mults[0])
        self.down = nn.ModuleList([EmbedSequential(nn.Conv2d(config.in_channels + config.cond_channels, ch, 3,
                                                                   padding=1))])
        skip_channels = [ch]
        res = config.image_size
        for level, mult in enumerate(mults):
            for _ in range(config.num_res_blocks):
                out_ch = int(base * mult)
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, config.dropout, out_ch)]
                ch = out_ch
                if res in attention_at:
                    layers.append(AttentionBlock(ch, config.num_heads))
                self.down.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(mults) - 1:
                self.down.append(EmbedSequential(ResBlock(ch, emb_dim, config.dropout, down=True)))
                skip_channels.append(ch)
                res //= 2

        self.middle = EmbedSequential(
            ResBlock(ch, emb_dim, config.dropout),
            AttentionBlock(ch, config.num_heads),
            ResBlock(ch, emb_dim, config.dropout),
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(config.num_res_blocks + 1):
                out_ch = int(base * mult)
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, config.dropout, out_ch)]
                ch = out_ch
                if res in attention_at:
                    layers.append(AttentionBlock(ch, config.num_heads))
                if level and i == config.num_res_blocks:
                    layers.append(ResBlock(ch, emb_dim, config.dropout, up=True))
                    res *= 2
                self.up.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, config.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t), or eps_theta(x_t, t, c) with the condition ``cond`` concatenated on channels."""
        if (cond is None) != (self.config.cond_channels == 0):
            raise ValueError(f"this UNet takes {self.config.cond_channels} condition channels; "
                             f"got {'none' if cond is None else cond.shape[1]}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embedding(t)
        skips = []
        h = x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_official_state_dict(model: UNet, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a state_dict of the authors' UNet (keys optionally prefixed ``module.`` by DataParallel).

    Raises ``ValueError`` naming missing, unexpected or mis-shaped tensors instead of loading partially.
    """
    cleaned = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(own))
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in cleaned.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with a different shape (e.g. {wrong[:3]})")
        raise ValueError(
            "checkpoint does not match the UNet configuration: " + "; ".join(parts)
            + f". Model config: {model.config}"
        )
    model.load_state_dict(cleaned)
