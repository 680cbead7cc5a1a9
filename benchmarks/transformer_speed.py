"""How fast DRDC's base transformer trains on this machine, against its measured matmul ceiling (issue 27, part 5).

One training step is what the engine does for DRDC's base model: the objective's draws, Eq. 1's loss with
feature jitter, backward, gradient clipping and AdamW (``ddad.engine.recipe.make_optimizer``), on random
features of the real shape (mobilenet_v2's 168 channels on a 14 x 14 grid at 224 px). The data loader is not
in it (the training features are cached in the run). FLOP are the matrix products of the model's arithmetic,
counted by torch's FlopCounterMode on a step with the attention weights materialised (the fused attention
kernel does the same products but is counted differently); GFLOP/s is that count over the measured time.

    python benchmarks/transformer_speed.py peak                 # fp32 matmul ceiling: 2048^3 and the model's shapes
    python benchmarks/transformer_speed.py train                # the README's CPU settings, batch 32
    python benchmarks/transformer_speed.py train --profile      # where the time goes (torch.profiler)
    python benchmarks/transformer_speed.py train --set hidden=256 --set ffn=1024

Run it on an idle machine: two jobs on two cores halve each other's rate.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from datetime import date

import torch

CPU_SETTINGS = {"hidden": 128, "encoder_layers": 2, "decoder_layers": 2, "ffn": 512}


def _time(fn, repeats: int, rounds: int = 3) -> float:
    """Seconds per call: the fastest of ``rounds`` rounds of ``repeats`` calls (a shared VM's noise only slows)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def matmul_ceiling(repeats: int) -> dict:
    """GFLOP/s of fp32 matrix products: one large square product and the base model's own largest shapes
    (batch 32 of 196 tokens: the feed-forward's 6272 x 128 x 512 and the projections' 6272 x 128 x 128)."""
    out = {}
    for name, (m, k, n) in {"2048^3": (2048, 2048, 2048), "6272x128x512": (6272, 128, 512),
                            "6272x512x128": (6272, 512, 128), "6272x128x128": (6272, 128, 128)}.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        dt = _time(lambda: a @ b, repeats)
        out[name] = round(2 * m * k * n / dt / 1e9, 1)
    return out


def train_step_speed(settings: dict, batch: int, steps: int, profile: bool) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from ddad.engine.recipe import TrainConfig, make_optimizer
    from ddad.methods.drdc.model import FeatureReconstructionObjective, FeatureReconstructor
    from ddad.methods.drdc.settings import ReconstructionConfig

    torch.manual_seed(0)
    cfg = replace(ReconstructionConfig(), **settings)
    model = FeatureReconstructor(168, 14, cfg).train()
    objective = FeatureReconstructionObjective(cfg)
    optimizer = make_optimizer(model, TrainConfig(optimizer="adamw", lr=4e-4), torch.device("cpu"))
    x = torch.randn(batch, 168, 14, 14)
    generator = torch.Generator().manual_seed(0)

    def step():
        loss = objective.loss(model, x, objective.draw(batch, x.shape[1:], generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    counting = FeatureReconstructor(168, 14, replace(cfg, attention_dropout=0.5)).train()
    counter = FlopCounterMode(display=False)
    with counter:
        objective.loss(counting, x, objective.draw(batch, x.shape[1:], generator)).backward()
    gflop = counter.get_total_flops() / 1e9
    dt = _time(step, steps)
    row = {"settings": settings, "batch": batch, "s_per_step": round(dt, 3), "images_per_s": round(batch / dt, 1),
           "gflop_per_image": round(gflop / batch, 3), "gflop_per_s": round(gflop / dt, 1)}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("peak", "train"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a ReconstructionConfig field over the CPU settings (integers)")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    head = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.what == "peak":
        row = {**head, "gflop_per_s": matmul_ceiling(args.steps)}
    else:
        settings = dict(CPU_SETTINGS)
        for item in args.set:
            key, value = item.split("=", 1)
            settings[key] = float(value) if "." in value else int(value)
        row = {**head, **train_step_speed(settings, args.batch, args.steps, args.profile)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
