"""Training throughput with 1 and N processes (torch.distributed, gloo on a CPU, NCCL on GPUs), issue 20.

    python benchmarks/distributed.py --out benchmarks/results/distributed.jsonl            # 1 and 2 processes
    python benchmarks/distributed.py --processes 1 2 4 --device cuda --size 256 --model ddad-s   # on a GPU machine

Each configuration trains ``--steps`` optimizer steps of DDAD's UNet at ``--size`` px on a synthetic dataset
with the same global batch, started as torchrun starts its workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT).
Images per second = global batch x steps / training seconds, from rank 0's log (its "training stopped" line
counts its own share of the images, which the world size multiplies back). On a CPU the threads are split:
every process gets cores / N intra-op threads, so 1 process with 2 threads is compared with 2 processes with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args, data: Path, work: Path) -> dict:
    run_dir = work / f"run-{world}"
    port = _port()
    threads = max(1, (os.cpu_count() or 1) // world) if args.device == "cpu" else None
    procs = []
    t0 = time.perf_counter()
    for rank in range(world):
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "ddad", "train", "--data-root", str(data), "--category", "washer",
               "--image-size", str(args.size), "--model", args.model, "--batch-size", str(args.batch),
               "--max-steps", str(args.steps), "--val-ratio", "0", "--device", args.device, "--quiet",
               "--checkpoint-minutes", "1000", "--run-dir", str(run_dir)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit("\n".join(outs))
    line = [x for x in (run_dir / "train.log").read_text().splitlines() if "training stopped" in x][-1]
    local = float(re.search(r"\(([\d.]+) img/s\)", line).group(1))
    return {"processes": world, "threads_per_process": threads, "device": args.device, "model": args.model,
            "size": args.size, "global_batch": args.batch, "steps": args.steps, "images_per_s": local * world,
            "wall_s_with_startup": wall, "date": str(date.today())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", default="compact")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "ddad", "synth", str(work / "data"), "--size", str(args.size),
                        "--train", "64", "--categories", "washer"], check=True, capture_output=True)
        for world in args.processes:
            row = run(world, args, work / "data", work)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
