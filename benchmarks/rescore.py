"""What the detection side can still buy on one trained checkpoint (issue 8, fourth round).

    python benchmarks/rescore.py runs/budget-mtd64-default --checkpoint epoch-00016-step-0000777.safetensors \
        --weights ema --samples 4 --border 4 --positional --out runs/rescore.jsonl

Every variant scores the run's whole test split against its reconstructions with the run's detection
settings (pretrained backbone, calibrated Eq. 9 maxima taken over ``--calibration-images`` defect-free
training images, a seeded subset as in ``ddad test``), and prints image AUROC / pixel AUROC / PRO for
combined, pixel-only and feature-only maps:

  --samples K     average D_p and D_f (Eq. 8) over K stochastic reconstructions (detection seeds
                  0..K-1; eta = 1 makes them differ) before Eq. 9; rows for K = 1..K
  --border B      also rows whose image score (max of the map) ignores B pixels at each edge; the maps, and
                  so pixel AUROC and PRO, are unchanged
  --positional    also rows with ddad's positional normalisation: D_p and D_f divided by their (floored) mean
                  over the calibration images at each pixel before Eq. 9 (ddad.scoring.ScoreScale)
  --pad P         reflect-pad each image by P pixels before the diffusion and crop the reconstruction
                  back (border context for the UNet); not cached

Test-split reconstructions come from, and go to, the run's cache (the ones ``budget.py eval`` made).
Rows are appended to ``--out`` as JSON lines.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from ddad import load_config, load_detector, with_detection
from ddad.data.splits import calibration_images, load_test_split
from ddad.engine.testing import split_metrics
from ddad.methods.ddad.loading import reconstruct_split
from ddad.runs import RunDir
from ddad.scoring import ScoreScale, anomaly_map


def distances(detector, images: torch.Tensor, recon: torch.Tensor, bs: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [detector.distances(recon[i:i + bs], images[i:i + bs]) for i in range(0, len(images), bs)]
    return torch.cat([p for p, _ in parts]), torch.cat([f for _, f in parts])


def reconstruct(detector, images: torch.Tensor, pad: int, bs: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(images), bs):
        x = images[i:i + bs]
        if pad:
            x = F.pad(x, (pad,) * 4, mode="reflect")
        r = detector.reconstruct(x).cpu()
        out.append(r[..., pad:-pad, pad:-pad] if pad else r)
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--border", type=int, default=0)
    p.add_argument("--positional", action="store_true")
    p.add_argument("--pad", type=int, default=0)
    p.add_argument("--calibration-images", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    run = RunDir(args.run_dir)
    config = with_detection(load_config(run), checkpoint=args.checkpoint, average=args.weights, adapted=False,
                            normalization="calibrated")
    base = config.detect
    split = load_test_split(config.data, progress=False)
    good = calibration_images(config.data, args.calibration_images, base.seed)
    detector, _ = load_detector(run, config, calibrate=False, progress=False)
    test_p, test_f, good_p, good_f = [], [], [], []
    for seed in range(args.samples):
        detector.config = replace(base, seed=seed)
        recon = (reconstruct(detector, split.images, args.pad) if args.pad
                 else reconstruct_split(detector, run, with_detection(config, seed=seed), split, progress=False))
        d_p, d_f = distances(detector, split.images, recon)
        test_p.append(d_p)
        test_f.append(d_f)
        d_p, d_f = distances(detector, good, reconstruct(detector, good, args.pad))
        good_p.append(d_p)
        good_f.append(d_f)
        print(f"reconstructions with seed {seed}: done", flush=True)

    size = split.images.shape[-1]
    for k in range(1, args.samples + 1):
        for positional in sorted({False, args.positional}):
            d_p, d_f = torch.stack(test_p[:k]).mean(0), torch.stack(test_f[:k]).mean(0)
            scale = ScoreScale.from_distances(torch.stack(good_p[:k]).mean(0), torch.stack(good_f[:k]).mean(0),
                                              positional=positional)
            normalization = "positional" if positional else "calibrated"
            for mode in ("combined", "pixel", "feature"):
                if mode == "combined" or not positional:
                    maps = anomaly_map(d_p, d_f, replace(base.scoring, mode=mode, normalization=normalization), scale)
                else:  # the single terms divided by the same per-pixel means
                    maps = anomaly_map(d_p / scale.mean_pixel, d_f / scale.mean_feature,
                                       replace(base.scoring, mode=mode), None)
                for b in sorted({0, args.border}):
                    inner = maps[..., b:size - b, b:size - b] if b else maps
                    m = split_metrics(split, inner.flatten(1).amax(1).numpy(), maps, 1.0)
                    m = {"image_auroc": m.image_auroc, "pixel_auroc": m.pixel_auroc, "pro": m.pro}
                    row = {"run": str(args.run_dir), "checkpoint": args.checkpoint, "weights": args.weights,
                           "samples": k, "border": b, "positional": positional, "pad": args.pad,
                           "calibration_images": len(good), "mode": mode, **m, "date": str(date.today())}
                    print(f"K={k} border={b} positional={positional} pad={args.pad} {mode:8s} "
                          + " / ".join(f"{100 * v:.1f}" for v in m.values()), flush=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
