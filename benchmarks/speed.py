"""Speed benchmarks: training throughput and detection latency / peak memory.

Each measurement runs in its own subprocess so peak memory (RSS on CPU, max allocated on CUDA) belongs
to that configuration alone. Results are printed as a Markdown table and appended as JSON lines to
``--out``.

    python benchmarks/speed.py train --presets ddad-s ddad --batch 8
    python benchmarks/speed.py infer --presets ddad-s ddad --backbones wide_resnet101_2 mobilenet_v2 --batches 1 16
    python benchmarks/speed.py infer --presets ddad-s --backbones wide_resnet101_2 --backends torch compiled onnxruntime
    python benchmarks/speed.py peak                      # measured fp32 matmul ceiling of this machine
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_train(preset: str, size: int, batch: int, steps: int, device_name: str, precision: str) -> dict:
    from ddad.diffusion.schedule import ScheduleConfig, alphas_cumprod
    from ddad.diffusion.unet import UNet, UNetConfig
    from ddad.runtime import autocast, resolve_device
    from ddad.diffusion.objective import ddpm_loss
    from ddad.engine.recipe import TrainConfig, make_optimizer

    device = resolve_device(device_name)
    model = UNet(UNetConfig.preset(preset, size, 3)).to(device).train()
    opt = make_optimizer(model, TrainConfig(), device)
    table = alphas_cumprod(ScheduleConfig()).to(device, torch.float32)
    x = torch.randn(batch, 3, size, size, device=device)

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        with autocast(device, precision):
            loss = ddpm_loss(model, x, t, torch.randn_like(x), table)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"kind": "train", "preset": preset, "size": size, "batch": batch, "precision": precision,
            "device": str(device), "images_per_s": batch * steps / dt, "peak_mb": _peak_mb(device)}


def matmul_peak(device_name: str, n: int = 2048, repeats: int = 10) -> dict:
    """Sustained fp32 (and on CUDA bf16) matmul throughput: the ceiling for these networks."""
    from ddad.runtime import resolve_device

    device = resolve_device(device_name)
    out = {"kind": "peak", "device": str(device)}
    for dtype in ([torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[f"gflops_{str(dtype).split('.')[-1]}"] = 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9
    return out


def count_gflop_per_image(preset: str, size: int, backbone: str, steps: int) -> float:
    """FLOPs of DDAD-n for one image: n UNet calls + the extractor on x0 and y (2 images)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ddad.backbones import create_backbone
    from ddad.diffusion.unet import UNet, UNetConfig

    unet = UNet(UNetConfig.preset(preset, size, 3)).eval()
    ext = create_backbone(backbone, (2, 3), weights="random").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as unet_count:
        unet(torch.zeros(1, 3, size, size), torch.tensor([100]))
    with torch.no_grad(), FlopCounterMode(display=False) as ext_count:
        ext(torch.zeros(2, 3, size, size))
    return (steps * unet_count.get_total_flops() + ext_count.get_total_flops()) / 1e9


def measure_infer(preset: str, size: int, batch: int, backbone: str, weights: str, repeats: int,
                  device_name: str, precision: str, steps: int, backend: str = "torch",
                  channels_last: bool = False, micro_batch: int | None = 0) -> dict:
    from ddad.backbones import create_backbone
    from ddad import DetectConfig, Detector, RuntimeConfig
    from ddad.diffusion.sampler import SamplerConfig, skip_for_steps
    from ddad.diffusion.unet import UNet, UNetConfig
    from ddad.runtime import resolve_device
    from ddad.scoring import ScoringConfig

    device = resolve_device(device_name)
    unet = UNet(UNetConfig.preset(preset, size, 3)).eval()
    cfg = DetectConfig(sampler=SamplerConfig(250, skip_for_steps(250, steps), w=3, eta=1),
                       # per-image maxima: the same work per image as calibrated ones, no calibration pass
                       scoring=ScoringConfig(mode="combined", normalization="image"), backbone=backbone,
                       precision=precision)
    runtime = RuntimeConfig(batch_size=batch, compile=backend == "compiled", channels_last=channels_last,
                            micro_batch=micro_batch)
    extractor = create_backbone(backbone, (2, 3), weights=weights)
    if backend == "onnxruntime":
        import tempfile

        from ddad.export import ExtractorGraph, OnnxDenoiser, OnnxExtractor, export_graph

        folder = Path(tempfile.mkdtemp())
        x2 = torch.zeros(2, 3, size, size)
        export_graph(unet, (x2, torch.tensor([250, 25])), folder / "unet.onnx", ["x", "t"], ["eps"])
        export_graph(ExtractorGraph(extractor, (2, 3)), (x2,), folder / "extractor.onnx", ["image"],
                     ["stage2", "stage3"])
        unet, extractor = OnnxDenoiser(folder / "unet.onnx"), OnnxExtractor(folder / "extractor.onnx", (2, 3))
    det = Detector(unet, cfg, device=device, extractor=extractor, runtime=runtime)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    # Warm-up. One image: on the CPU a full-batch warm-up would double the cost. Compiled networks see
    # every input shape once first (the extractor runs on whole batches), so compiling is not timed.
    det(x if backend == "compiled" else x[:1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        det(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / repeats
    gflop = count_gflop_per_image(preset, size, backbone, steps)
    return {"kind": "infer", "preset": preset, "size": size, "batch": batch, "backbone": backbone,
            "weights": weights, "steps": steps, "precision": precision, "device": str(device),
            "backend": backend, "channels_last": channels_last, "micro_batch": micro_batch,
            "seconds_per_image": dt / batch,
            "images_per_s": batch / dt, "gflop_per_image": gflop, "gflops": gflop * batch / dt,
            "peak_mb": _peak_mb(device)}


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    spec = json.loads(args.child)
    fn = {"train": measure_train, "infer": measure_infer, "peak": matmul_peak}[spec.pop("kind")]
    print(json.dumps(fn(**spec)))


def _run(spec: dict, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", nargs="?", choices=("train", "infer", "peak"))
    p.add_argument("--backends", nargs="+", default=["torch"], choices=("torch", "compiled", "onnxruntime"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--micro-batch", type=int, default=0, help="0: whole batch (default here); -1: automatic")
    p.add_argument("--presets", nargs="+", default=["ddad-s", "ddad"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="inference batches")
    p.add_argument("--backbones", nargs="+", default=["wide_resnet101_2", "mobilenet_v2"])
    p.add_argument("--weights", default=None, help="backbone weights (default: real if found, else random)")
    p.add_argument("--steps", type=int, default=10, help="DDAD-n")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.jsonl"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    from ddad.backbones import WeightsNotFound, resolve_weights

    rows = []
    if args.what == "peak":
        rows.append(_run({"kind": "peak", "device_name": args.device}, args.threads))
        print(rows[-1], flush=True)
    elif args.what == "train":
        for preset in args.presets:
            rows.append(_run({"kind": "train", "preset": preset, "size": args.size, "batch": args.batch,
                              "steps": args.train_steps, "device_name": args.device,
                              "precision": args.precision}, args.threads))
            print(rows[-1], flush=True)
    else:
        for preset in args.presets:
            for backbone in args.backbones:
                weights = args.weights
                if weights is None:
                    try:
                        resolve_weights(backbone)
                    except WeightsNotFound:
                        weights = "random"
                for backend in args.backends:
                    for batch in args.batches:
                        rows.append(_run({"kind": "infer", "preset": preset, "size": args.size, "batch": batch,
                                          "backbone": backbone, "weights": weights, "repeats": args.repeats,
                                          "device_name": args.device, "precision": args.precision,
                                          "steps": args.steps, "backend": backend,
                                          "channels_last": args.channels_last,
                                          "micro_batch": None if args.micro_batch < 0 else args.micro_batch},
                                         args.threads))
                        print(rows[-1], flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "date": str(date.today()), "machine": machine}) + "\n")


if __name__ == "__main__":
    main()
