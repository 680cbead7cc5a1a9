"""Image and pixel AUROC (and PRO) of an exported model in fp32 and INT8 on its run's test split, through the
torch-free runtime (OpenVINO), with the decisions of each compared: what ``ddad export --int8`` costs in
quality, and how fast each precision scores on this CPU.

    python benchmarks/int8_quality.py RUN EXPORT_DIR [EXPORT_DIR2 ...] [--threads 2] --out F.json

EXPORT_DIR: written by ``ddad export RUN --format openvino --int8 [STRATEGY]``; the fp32 graphs of the first
are scored once, the INT8 graphs of each. The fp32 export scores like the run (tests: 1e-4 relative), so its
metrics are the run's; an INT8 model decides with the fp32 thresholds.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("exports", type=Path, nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--every", type=int, default=1, help="every K-th test image only (in index order)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    import ddad_infer
    from ddad import load_config
    from ddad.data.splits import load_test_split
    from ddad.metrics import evaluate
    from ddad.scoring import crop

    config = load_config(args.run)
    split = load_test_split(config.data, progress=False)
    split = split.subset(slice(None, None, args.every))
    fraction = getattr(config.detect, "crop", 1.0)
    images, masks = split.images.numpy(), crop(split.masks.float(), fraction)[:, 0].numpy() > 0.5

    def measure(folder: Path, precision: str) -> dict:
        model = ddad_infer.load(folder, backend="openvino", threads=args.threads, precision=precision)
        categories = [s.category for s in split.samples] if model.categories else None
        start = time.perf_counter()
        out = model.predict_arrays(images, categories)
        seconds = (time.perf_counter() - start) / len(images)
        maps = crop(torch.from_numpy(out["anomaly_map"]), fraction)[:, 0].numpy()
        row = {**evaluate(out["score"], split.labels, maps, masks, split.has_masks), "seconds_per_image": seconds,
               "scores": out["score"].tolist(),
               "labels": None if out["pred_label"] is None else out["pred_label"].astype(int).tolist()}
        print(folder.name, precision, {k: v for k, v in row.items() if k not in ("scores", "labels")}, flush=True)
        return row

    fp32 = measure(args.exports[0], "fp32")
    summary = {"run": str(args.run), "date": date.today().isoformat(), "threads": args.threads, "every": args.every,
               "images": len(images), "defective": int(split.labels.sum()), "fp32": fp32, "int8": {}}
    for folder in args.exports:
        int8 = measure(folder, "int8")
        summary["int8"][str(folder)] = {
            "record": json.loads((folder / "export.json").read_text()).get("int8"),
            "delta_points": {k: None if fp32[k] is None else 100 * (int8[k] - fp32[k])
                             for k in ("image_auroc", "pixel_auroc", "pro")},
            "labels_differ": None if fp32["labels"] is None else
            int(np.sum(np.array(fp32["labels"]) != np.array(int8["labels"]))),
            "max_score_change_rel": float(np.max(np.abs(np.array(int8["scores"]) - fp32["scores"]) /
                                                 np.abs(fp32["scores"]).max())),
            **int8}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    for folder, row in summary["int8"].items():
        print(folder, row["record"]["graphs"] if row["record"] else None, row["delta_points"],
              "labels differ:", row["labels_differ"])


if __name__ == "__main__":
    main()
