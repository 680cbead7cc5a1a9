"""A memory bank of defect-free patch features (PatchCore, Roth et al. 2022, Sec. 3.2-3.3): the greedy
k-center coreset that keeps a fraction of the training patches, and nearest-neighbour distances to it in
bounded memory. Shared by every method that scores against a bank; pure functions over tensors.

Coreset (the paper's Algorithm 1): the features are projected at random to ``projection_dim`` dimensions
(Johnson-Lindenstrauss, as the paper), the first centre is drawn from the seed, then each next centre is
the point farthest from the centres chosen so far:

    c_{i+1} = argmax_m  min_{c in C_i} || psi(m) - psi(c) ||_2

The picks are exact; only blocks of points that can hold the next pick are brought up to date, in cache-sized
matrix products (see :func:`greedy_coreset`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddad_infer.banks import UNIFIED, banks_for  # one rule for the run and its export

from .checkpoint import atomic_write
from .results import safe_name


@dataclass(frozen=True)
class BankConfig:
    """A memory bank: a greedy coreset of the training patches."""

    fraction: float = 0.1  # of the training patches kept (1.0: all of them)
    projection_dim: int = 128  # the coreset search's random projection
    per_category: bool = True  # one bank per category, else one for all the categories of the run
    seed: int = 0  # the coreset's projection and first pick

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"bank.fraction must be in (0, 1], got {self.fraction}")
        if self.projection_dim < 1:
            raise ValueError(f"bank.projection_dim must be >= 1, got {self.projection_dim}")


def as_patches(features: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) feature maps -> (B * h * w, D) patches, image by image, row by row."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


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
                   progress: bool = False, block: int = 2048) -> torch.Tensor:
    """Indices (k,) of the greedy k-center coreset of ``features`` (M, D), in the order they were picked.

    Exact, but lazy: the points are kept in blocks of ``block`` rows, each with an upper bound of its
    points' distances to their nearest centre (distances only shrink as centres are added). The next pick
    is in the block of the largest bound once that block is brought up to date (its points measured against
    the centres picked since its last update, in one matrix product): every other block's points are then at
    most its bound away, which is at most this block's true maximum. Blocks far from any pick's distance
    are never touched, and the updates are cache-sized matrix products instead of a pass over the whole
    bank per pick."""
    from tqdm.auto import tqdm

    m = features.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"a coreset of {k} points from {m} is not possible")
    z = random_projection(features, projection_dim, seed).contiguous()
    sq = (z * z).sum(dim=1)
    starts = list(range(0, m, block))
    nearest = torch.full((m,), float("inf"))  # squared distance to the nearest centre applied so far
    bound = torch.full((len(starts),), float("inf"))  # >= every nearest of the block
    applied = [0] * len(starts)  # how many of the picks each block has been measured against
    picked = torch.empty(k, dtype=torch.long)
    picked[0] = int(torch.randint(m, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen, chosen_sq = torch.empty(k, z.shape[1]), torch.empty(k)
    chosen[0], chosen_sq[0] = z[picked[0]], sq[picked[0]]
    for i in tqdm(range(1, k), desc="coreset", unit="pick", disable=not progress, leave=False, mininterval=1.0):
        while True:
            b = int(bound.argmax())
            lo = starts[b]
            hi = min(lo + block, m)
            if applied[b] == i:
                break  # up to date, and no other block can hold a farther point
            new = slice(applied[b], i)
            d2 = sq[lo:hi, None] + chosen_sq[None, new] - 2 * (z[lo:hi] @ chosen[new].T)
            torch.minimum(nearest[lo:hi], d2.amin(dim=1).clamp_min_(0), out=nearest[lo:hi])
            applied[b] = i
            bound[b] = nearest[lo:hi].max()
        j = lo + int(nearest[lo:hi].argmax())
        picked[i], chosen[i], chosen_sq[i] = j, z[j], sq[j]
    return picked


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 512, block: int = 4096) -> torch.Tensor:
    """(Q,) Euclidean distance of each query (Q, D) to its nearest bank row (M, D), exactly (brute force).

    ``chunk`` queries against ``block`` bank rows at a time (8 MB of distances at the defaults, so they stay in
    the CPU's cache; the minimum is carried across blocks): memory stays bounded whatever Q and M are. The
    nearest row is found through the expansion |q|^2 + |b|^2 - 2 q.b (one matrix product per block), then its
    distance is taken directly (no cancellation error for a query close to a row). Measured on the unified
    DRDC bank (69,678 x 168, 2 threads): 59 ms per image of 196 tokens, against 147 ms with whole bank rows
    per query chunk, and 36 ms for faiss-cpu's exact index: not enough to add a dependency (BENCHMARKS.md,
    "Memory bank")."""
    if bank.ndim != 2 or queries.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries (Q, D) and bank (M, D) must share D, got {tuple(queries.shape)} and "
                         f"{tuple(bank.shape)}")
    bank = bank.float()
    bank_sq = (bank * bank).sum(dim=1)
    bank_t = bank.T.contiguous()
    out = torch.empty(queries.shape[0])
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk].float()
        best = torch.full((len(q),), float("inf"))
        nearest = torch.zeros(len(q), dtype=torch.long)
        for first in range(0, len(bank), block):
            # |q - b|^2 less |q|^2 (the same for every b) for this block of rows
            value, index = torch.addmm(bank_sq[first:first + block], q, bank_t[:, first:first + block], alpha=-2).min(1)
            closer = value < best  # ties keep the earlier row, as one argmin over the whole row would
            best = torch.where(closer, value, best)
            nearest = torch.where(closer, index + first, nearest)
        out[start:start + chunk] = (q - bank[nearest]).norm(dim=1)
    return out


def fit_coreset(patches: torch.Tensor, bank: BankConfig, progress: bool = False) -> torch.Tensor:
    """The bank of ``patches`` (M, D): its coreset of ``bank.fraction`` (all of them at 1.0)."""
    k = coreset_size(len(patches), bank.fraction)
    if k == len(patches):
        return patches.contiguous()
    return patches[greedy_coreset(patches, k, bank.projection_dim, bank.seed, progress)].contiguous()


def bank_groups(per_category: bool, categories: Sequence[str]) -> dict[str, list[int]]:
    """The training images of each bank, by bank name (``categories[i]``: image i's): one per category, or
    all in one (:data:`UNIFIED`)."""
    if not per_category:
        return {UNIFIED: list(range(len(categories)))}
    return {c: [i for i, x in enumerate(categories) if x == c] for c in dict.fromkeys(categories)}


def nearest_by_category(features: torch.Tensor, banks: Mapping[str, torch.Tensor],
                        categories: Sequence[str | None] | None = None) -> torch.Tensor:
    """(B, 1, h, w): each position's distance to the nearest row of its image's bank(s) (:func:`banks_for`),
    from ``features`` (B, D, h, w); the images of one category in one search per bank."""
    b, _, h, w = features.shape
    categories = list(categories) if categories is not None else [None] * b
    out = torch.empty(b, 1, h, w)
    for category in dict.fromkeys(categories):
        rows = [i for i, c in enumerate(categories) if c == category]
        queries = as_patches(features[rows])
        nearest = torch.stack([nearest_distances(queries, bank) for bank in banks_for(banks, category)]).amin(0)
        out[rows] = nearest.view(len(rows), 1, h, w).cpu()
    return out.to(features.device)

# Banks on disk: FOLDER/<name>.safetensors, the tensor "bank" and the bank's name and facts as metadata.

def bank_file(folder: Path, name: str) -> Path:
    return Path(folder) / f"{safe_name(name)}.safetensors"


def save_bank(folder: Path, name: str, bank: torch.Tensor, **facts) -> Path:
    """Writes the bank atomically (a half-written bank is never read); ``facts`` as JSON metadata."""
    path = bank_file(folder, name)
    atomic_write(path, lambda tmp: save_file({"bank": bank.contiguous()}, tmp, metadata={
        "name": name, "facts": json.dumps(facts)}))
    return path


def stored_banks(folder: Path) -> dict[str, Path]:
    """The banks in ``folder`` by the name stored in each file."""
    found = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            found[(fh.metadata() or {}).get("name", path.stem)] = path
    return found


def load_bank(path: Path) -> tuple[torch.Tensor, dict]:
    """(the bank, its facts)."""
    with safe_open(str(path), "pt") as fh:
        facts = json.loads((fh.metadata() or {}).get("facts", "{}"))
    return load_file(str(path))["bank"], facts


def load_banks(folder: Path, names: Sequence[str], remedy: str) -> dict[str, tuple[torch.Tensor, dict, Path]]:
    """The banks ``names`` from ``folder``: (bank, facts, file) by name; missing ones are an error that
    names them and ``remedy`` (the command that fits them)."""
    stored = stored_banks(folder)
    missing = [name for name in names if name not in stored]
    if missing:
        raise FileNotFoundError(f"no memory bank for {', '.join(missing)} in {folder}; {remedy}")
    return {name: (*load_bank(stored[name]), stored[name]) for name in names}
