"""Seconds per image of one DDAD run scored four ways on this CPU: ddad in PyTorch (eager, and compiled with
the fastest CPU flags), and its export through ddad_infer in ONNX Runtime and in OpenVINO (fp32; INT8 where exported). Each way
runs in its own process (peak memory is its own), on the same images, batch by batch after one warm-up batch;
the scores of each are compared with PyTorch eager's.

    python benchmarks/export_speed.py RUN EXPORT_DIR IMAGES_DIR [--batch 4] [--threads 2] [--images 8] --out F.json

EXPORT_DIR: written by ``ddad export RUN --format openvino [--int8]`` (it holds the ONNX graphs too).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

WAYS = ("torch", "torch-compiled", "onnxruntime", "openvino", "openvino-int8")


def measure(way: str, run: Path, export: Path, files: list[Path], batch: int, threads: int) -> dict:
    """One way, in this process: seconds per image over the batches after the first, and the scores."""
    import numpy as np

    if way.startswith("torch"):
        import torch

        from ddad import load_config, load_model
        from ddad.data.io import read_image

        torch.set_num_threads(threads)
        config = load_config(run)
        if way == "torch-compiled":
            from dataclasses import replace
            config = replace(config, runtime=replace(config.runtime, compile=True, channels_last=True, micro_batch=1,
                                                     batch_size=batch))
        model = load_model(run, config)
        size, channels = config.data.image_size, config.data.channels
        images = torch.stack([read_image(p, channels, size) for p in files])
        score = lambda x: model(x).score.numpy()  # noqa: E731
    else:
        import ddad_infer
        from ddad_infer.images import load_image

        model = ddad_infer.load(export, backend=way.split("-")[0], threads=threads,
                                precision="int8" if way.endswith("int8") else "fp32")
        model.batch_size = batch
        images = np.stack([load_image(p, model.channels, model.image_size) for p in files])
        score = lambda x: model.predict_arrays(x)["score"]  # noqa: E731
    scores = [score(images[:batch])]  # warm-up (compilation, graph loading)
    start = time.perf_counter()
    for i in range(batch, len(files), batch):
        scores.append(score(images[i:i + batch]))
    seconds = (time.perf_counter() - start) / (len(files) - batch)
    return {"way": way, "seconds_per_image": seconds, "scores": [float(s) for part in scores for s in part],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("export", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", dest="count", type=int, default=8)
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this way and print JSON
    args = ap.parse_args(argv)
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".bmp"))[:args.count]
    if args.one:
        print(json.dumps(measure(args.one, args.run, args.export, files, args.batch, args.threads)))
        return
    rows = []
    for way in args.ways.split(","):
        out = subprocess.run([sys.executable, __file__, str(args.run), str(args.export), str(args.images), "--batch",
                              str(args.batch), "--threads", str(args.threads), "--images", str(args.count),
                              "--one", way], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{way} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        ref = rows[0]["scores"]
        rows[-1]["max_relative_score_difference"] = max(abs(a - b) / max(abs(b), 1e-12)
                                                        for a, b in zip(rows[-1]["scores"], ref))
        print(f"{way:15s} {rows[-1]['seconds_per_image']:.3f} s/img  peak {rows[-1]['peak_rss_gb']:.2f} GB  "
              f"scores vs {WAYS[0]}: {rows[-1]['max_relative_score_difference']:.2e}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "date": date.today().isoformat(),
                                        "batch": args.batch, "threads": args.threads, "images": len(files),
                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
