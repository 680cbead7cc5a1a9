"""The INT8 and fp32 matrix-product ceilings of this CPU in OpenVINO: one (n x n) @ (n x n) product with
constant weights, as fp32, and quantised by NNCF (weights and activations INT8), timed after a warm-up.
The INT8 operations per second of an exported model are measured against the INT8 figure.

    python benchmarks/int8_peak.py [--n 2048] [--threads 2] [--repeats 10] --out F.json
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np


def build(n: int):
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([n, n], np.float32, name="x")
    w = ops.constant(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
    return ov.Model([ops.matmul(x, w, False, False)], [x], "matmul")


def timed(model, n: int, threads: int, repeats: int) -> float:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                      "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    x = np.random.default_rng(1).normal(size=(n, n)).astype(np.float32)
    request.infer({0: x})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer({0: x})
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import nncf

    fp32 = build(args.n)
    calibration = [np.random.default_rng(i).normal(size=(args.n, args.n)).astype(np.float32) for i in range(2)]
    int8 = nncf.quantize(build(args.n), nncf.Dataset(calibration), subset_size=2)
    row = {"date": date.today().isoformat(), "n": args.n, "threads": args.threads, "best_of": args.repeats,
           "fp32_gflops": timed(fp32, args.n, args.threads, args.repeats),
           "int8_gops": timed(int8, args.n, args.threads, args.repeats)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1))
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
