"""The transformer's layers, written for the CPU's sake (issue 27, part 5): multi-head attention under a
fixed mask, and dropout.

:class:`MaskedAttention` is the function of ``torch.nn.MultiheadAttention`` (batch first, with its parameter
names and initialisation, so a seed gives the same weights and a checkpoint of either loads in the other):

    Q = (query) W_q + b_q,  K = (key) W_k + b_k,  V = (value) W_v + b_v          h heads of d = E / h
    A = softmax(Q K^T / sqrt(d) + M)            M: 0 where attention is allowed, -inf where it is forbidden
    out = (dropout(A) V) W_o + b_o              heads concatenated

What differs is the cost on a CPU, where ``nn.MultiheadAttention`` with a boolean mask spent most of a DRDC
training step outside its matrix products (BENCHMARKS.md, "The transformer base's speed"):

- without dropout on A (evaluation always; training when the attention dropout is 0) the heads go through
  ``F.scaled_dot_product_attention``, whose CPU kernel is fused (blocks of A never stored whole): about
  six times faster forward and backward than A materialised, on DRDC's 196 tokens;
- with dropout on A, A is materialised and dropped with the mask below;
- the mask is a float tensor made once (:func:`additive_mask`), not a boolean one converted and checked for
  fully masked rows on every call; when query and key are one tensor, one product projects both.

:func:`dropout` draws its keep mask from 16 random bits per element (64-bit draws cut in four) compared
with a threshold, about eight times faster on this CPU than ``bernoulli_``'s draw per element; the drop
probability is ``p`` rounded to a multiple of 2^-16 and the kept elements are divided by exactly the keep
probability, so the expectation is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """(keep, scale): a boolean tensor of ``shape``, each element False with probability ``p`` rounded to a
    multiple of 2^-16, independently, and 1 / P(keep). Drawn from the default generator (or ``generator``)."""
    threshold = round(p * _LEVELS)
    if not 0 <= threshold < _LEVELS:
        raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2 ** 63), None, generator=generator)  # every bit uniform
    values = words.view(torch.int16)[:n].view(shape)  # uniform on [-2^15, 2^15)
    return values >= threshold - _LEVELS // 2, _LEVELS / (_LEVELS - threshold)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` with :func:`dropout_keep_mask`'s mask: in training each element zeroed with probability
    ``p``, the others divided by the keep probability; the identity otherwise."""
    if not training or p == 0:
        return x
    keep, scale = dropout_keep_mask(x.shape, p, x.device)
    return x * keep.to(x.dtype).mul_(scale)  # one product forward and backward


class Dropout(nn.Module):
    """``nn.Dropout`` through :func:`dropout`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def additive_mask(forbidden: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean mask (True: forbidden) as the float mask added to the attention logits: 0 or -inf."""
    if forbidden is None:
        return None
    return torch.zeros(forbidden.shape).masked_fill(forbidden, float("-inf"))


class MaskedAttention(nn.Module):
    """``nn.MultiheadAttention(hidden, heads, dropout, batch_first=True)`` for inputs (B, N, E) and one
    additive (N_q, N_k) mask shared by the batch (:func:`additive_mask`)."""

    def __init__(self, hidden: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.hidden, self.heads, self.dropout = hidden, heads, dropout
        # nn.MultiheadAttention's order of construction and initialisation, so a seed gives the same weights
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden))
        self.out_proj = nn.Linear(hidden, hidden)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, E) -> (B, heads, N, d), a view."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def _queries_keys(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, w, bias = self.hidden, self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = F.linear(query, w[: 2 * e], bias[: 2 * e]).split(e, dim=-1)
        else:
            q, k = F.linear(query, w[:e], bias[:e]), F.linear(key, w[e: 2 * e], bias[e: 2 * e])
        return self._heads(q), self._heads(k)

    def attention_weights(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """A = softmax(Q K^T / sqrt(d) + M), (B, heads, N_q, N_k), before dropout."""
        q, k = self._queries_keys(query, key)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return torch.softmax(logits if mask is None else logits + mask, dim=-1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        e, (b, n_q, _) = self.hidden, query.shape
        q, k = self._queries_keys(query, key)
        v = self._heads(F.linear(value, self.in_proj_weight[2 * e:], self.in_proj_bias[2 * e:]))
        if mask is not None:
            mask = mask.to(q.dtype)
        if not self.training or self.dropout == 0:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # A materialised, dropped, and the keep probability's scale applied to the (smaller) output
            heads = b * self.heads
            q, k, v = (t.reshape(heads, t.shape[2], -1) for t in (q, k, v))
            scale = 1.0 / math.sqrt(q.shape[-1])
            logits = torch.bmm(q, k.transpose(1, 2)).mul_(scale) if mask is None else \
                torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale)
            weights = torch.softmax(logits, dim=-1)
            keep, keep_scale = dropout_keep_mask(weights.shape, self.dropout, weights.device)
            out = (torch.bmm(torch.where(keep, weights, 0.0), v) * keep_scale).view(b, self.heads, n_q, -1)
        return self.out_proj(out.transpose(1, 2).reshape(b, n_q, e))
