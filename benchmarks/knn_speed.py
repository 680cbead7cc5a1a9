"""Exact nearest-neighbour search for the memory banks: ddad's torch search against faiss-cpu's (issue 27).

    python benchmarks/knn_speed.py [--bank RUN/banks/NAME.safetensors] [--queries 196] [--images 16] \
        [--out benchmarks/results/unified/knn-speed.jsonl]

Both are exact (brute force: faiss ``IndexFlatL2``, ddad :func:`ddad.memory_bank.nearest_distances`); the
figure is milliseconds per image (``--queries`` tokens an image: 196 for DRDC's 14 x 14 grid, 784 for
PatchCore's 28 x 28) for a batch of ``--images``, the fastest of 3 rounds, with the threads torch uses. The
distances are compared (faiss returns squared distances in float32 through the same expansion). Needs
``pip install faiss-cpu``; an idle machine for the timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

from ddad.memory_bank import load_bank, nearest_distances


def fastest(fn, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", type=Path, help="a stored bank (default: random, 69678 x 168 as the unified DRDC bank)")
    ap.add_argument("--queries", type=int, default=196)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import faiss

    g = torch.Generator().manual_seed(0)
    bank = load_bank(args.bank)[0].float() if args.bank else torch.randn(69678, 168, generator=g)
    # queries near the bank, as test tokens are: bank rows plus noise
    picks = torch.randint(len(bank), (args.queries * args.images,), generator=g)
    queries = (bank[picks] + 0.3 * bank.std() * torch.randn(len(picks), bank.shape[1], generator=g)).contiguous()
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatL2(bank.shape[1])
    t0 = time.perf_counter()
    index.add(bank.numpy())
    add_s = time.perf_counter() - t0
    ours = nearest_distances(queries, bank)
    squared, _ = index.search(queries.numpy(), 1)
    theirs = torch.from_numpy(squared[:, 0]).clamp_min(0).sqrt()
    torch_s = fastest(lambda: nearest_distances(queries, bank))
    faiss_s = fastest(lambda: index.search(queries.numpy(), 1))
    row = {"date": date.today().isoformat(), "command": " ".join(sys.argv), "threads": threads,
           "bank": list(bank.shape), "queries_per_image": args.queries, "images": args.images,
           "torch_ms_per_image": 1000 * torch_s / args.images, "faiss_ms_per_image": 1000 * faiss_s / args.images,
           "faiss_index_build_s": add_s, "faiss_version": faiss.__version__,
           "max_abs_difference": float((ours - theirs).abs().max()), "mean_distance": float(ours.mean())}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
