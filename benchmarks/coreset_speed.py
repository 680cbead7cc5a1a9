"""The greedy coreset's time on real patches (issue 27): MTD's training images at 224 px, mobilenet_v2 stages 2
and 3 (locally aware, 128 dimensions), 10 % kept.

    python benchmarks/coreset_speed.py features /tmp/mtd_patches.pt     # the patches (about 20 s)
    python benchmarks/coreset_speed.py coreset /tmp/mtd_patches.pt [--picks K]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def cmd_features(args) -> None:
    from ddad.backbones import create_backbone
    from ddad.data.formats import DataConfig, build_index
    from ddad.data.splits import load_train_images
    from ddad.memory_bank import as_patches
    from ddad.methods.patchcore.model import patch_features
    from ddad.methods.patchcore.settings import PatchFeatures

    data = DataConfig(dataset="mtd", root=str(SHARED / "data" / "mtd"), image_size=224, channels=3)
    images = load_train_images(data, build_index(data), progress=False)
    extractor = create_backbone("mobilenet_v2", (2, 3), weights=str(SHARED / "weights" / "mobilenet_v2-b0353104.pth"))
    settings = PatchFeatures(backbone="mobilenet_v2")
    t0 = time.perf_counter()
    patches = torch.cat([as_patches(patch_features(extractor, images[i:i + 32], settings))
                         for i in range(0, len(images), 32)])
    print(f"{len(images)} images -> {tuple(patches.shape)} patches in {time.perf_counter() - t0:.1f} s")
    torch.save(patches.contiguous(), args.out)


def cmd_coreset(args) -> None:
    from ddad.memory_bank import coreset_size, greedy_coreset

    patches = torch.load(args.patches)
    k = args.picks or coreset_size(len(patches), 0.1)
    t0 = time.perf_counter()
    greedy_coreset(patches, k)
    seconds = time.perf_counter() - t0
    print(f"M={len(patches)} D={patches.shape[1]} k={k}: {seconds:.1f} s ({seconds / 60:.1f} min), "
          f"{seconds / max(k - 1, 1) * 1000:.2f} ms a pick")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("features").add_argument("out")
    c = sub.add_parser("coreset")
    c.add_argument("patches")
    c.add_argument("--picks", type=int)
    args = parser.parse_args()
    torch.set_num_threads(2)
    {"features": cmd_features, "coreset": cmd_coreset}[args.command](args)


if __name__ == "__main__":
    main()
