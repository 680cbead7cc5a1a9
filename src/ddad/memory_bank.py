"""A memory bank of defect-free patch features (PatchCore, Roth et al. 2022, Sec. 3.2-3.3): the greedy
k-center coreset that keeps a fraction of the training patches, and nearest-neighbour distances to it in
bounded memory. Shared by every method that scores against a bank; pure functions over tensors.

Coreset (the paper's Algorithm 1): the features are projected at random to ``projection_dim`` dimensions
(Johnson-Lindenstrauss, as the paper), the first centre is drawn from the seed, then each next centre is
the point farthest from the centres chosen so far:

    c_{i+1} = argmax_m  min_{c in C_i} || psi(m) - psi(c) ||_2

One pass over the bank per pick keeps each point's distance to its nearest centre (|z|^2 + |c|^2 - 2 z.c:
one matrix-vector product per pick, in chunks of ``chunk`` rows).
"""

from __future__ import annotations

import torch


def coreset_size(n: int, fraction: float) -> int:
    """How many of ``n`` patches a coreset of ``fraction`` keeps (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the coreset fraction must be in (0, 1], got {fraction}")
    return min(n, max(1, int(round(fraction * n))))


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """(M, D) -> (M, min(dim, D)): a seeded Gaussian projection (unchanged where D <= dim)."""
    d = features.shape[1]
    if d <= dim:
        return features.float()
    g = torch.Generator().manual_seed(seed)
    return features.float() @ (torch.randn(d, dim, generator=g) / dim ** 0.5)


def greedy_coreset(features: torch.Tensor, k: int, projection_dim: int = 128, seed: int = 0,
                   progress: bool = False) -> torch.Tensor:
    """Indices (k,) of the greedy k-center coreset of ``features`` (M, D), in the order they were picked."""
    from tqdm.auto import tqdm

    m = features.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"a coreset of {k} points from {m} is not possible")
    z = random_projection(features, projection_dim, seed).contiguous()
    sq = (z * z).sum(dim=1)
    first = int(torch.randint(m, (1,), generator=torch.Generator().manual_seed(seed)))
    picked = torch.empty(k, dtype=torch.long)
    picked[0] = first
    nearest = (sq - 2 * (z @ z[first]) + sq[first]).clamp_min_(0)
    update = torch.empty_like(nearest)
    for i in tqdm(range(1, k), desc="coreset", unit="pick", disable=not progress, leave=False, mininterval=1.0):
        nxt = int(nearest.argmax())
        picked[i] = nxt
        torch.mv(z, z[nxt], out=update)
        update.mul_(-2).add_(sq).add_(sq[nxt]).clamp_min_(0)
        torch.minimum(nearest, update, out=nearest)
    return picked


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(Q,) Euclidean distance of each query (Q, D) to its nearest bank row (M, D); ``chunk`` queries at a
    time, so memory stays at chunk x M distances whatever Q is. The nearest row is found through the
    expansion |q|^2 + |b|^2 - 2 q.b (one matrix product), then its distance is taken directly (no
    cancellation error for a query that is close to a row)."""
    if bank.ndim != 2 or queries.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries (Q, D) and bank (M, D) must share D, got {tuple(queries.shape)} and "
                         f"{tuple(bank.shape)}")
    bank = bank.float()
    bank_sq = (bank * bank).sum(dim=1)
    out = torch.empty(queries.shape[0])
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk].float()
        nearest = (bank_sq - 2 * (q @ bank.T)).argmin(dim=1)  # |q - b|^2 less |q|^2, the same for every b
        out[start:start + chunk] = (q - bank[nearest]).norm(dim=1)
    return out
