"""Do synthetic validation defects rank settings as real test defects do? (issue 31)

    python benchmarks/validation_defects.py RUN --out benchmarks/results/validation-defects/NAME.json [--seeds 0,1,2]

For every candidate of ``ddad tune``'s grid (the run's method), scored once on each split:
- validation with the mix of every kind of synthetic defect, drawn with each of ``--seeds`` (default what ``ddad
  tune`` uses: seeds 0, 1, 2 and more where the held-out images are too few for 64 defects), its figures per kind and per seed;
- validation with the earlier defects (``perlin`` and ``paste``, one seed: what ``ddad tune`` used before);
- the test split (its real defects), for the oracle.
Reported: the Spearman rank agreement between each validation objective (the mix, each kind, each seed, the
earlier defects) and the test objective over the candidates, for the objective (mean of image and pixel
AUROC) and for each AUROC alone; and the test figures of the honest choices (the robust rule on the mix; the
plain best on the mix; the plain best on the earlier defects) against the oracle's (the best on test). The
run's config.yaml is not changed; the test split is read after every validation figure is computed. With the user's real validation defects
(``--val-abnormal-dir``) both validation views are those real defects.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from ddad.api import load_config
from honest import fmt  # noqa: E402 (benchmarks/, the script's own folder)
from ddad.data.anomalies import SyntheticAnomalies, synthetic_origin
from ddad.data.splits import load_test_split, load_validation_split
from ddad.engine import tuning
from ddad.methods import get_method
from ddad.runs import RunDir

FIELDS = ("objective", "image_auroc", "pixel_auroc")


def rank_agreement(validation: list, test: list) -> float | None:
    pairs = [(v, t) for v, t in zip(validation, test) if v is not None and t is not None]
    if len(pairs) < 3 or len({v for v, _ in pairs}) < 2:
        return None
    return float(spearmanr([v for v, _ in pairs], [t for _, t in pairs]).statistic)


def agreements(rows: list[dict], test_rows: list[dict]) -> dict:
    """Spearman per validation view (mix, kind:K, seed:S) and field."""
    views = {"mix": lambda r: r}
    for group in ("kinds", "seeds"):
        for name in rows[0].get(group, {}):
            views[f"{group[:-1]}:{name}"] = lambda r, g=group, n=name: r[g][n]
    return {view: {f: rank_agreement([pick(r)[f] for r in rows], [t[f] for t in test_rows]) for f in FIELDS}
            for view, pick in views.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default=None, help="default: ddad tune's (tuning.SEEDS, extended to MIN_DEFECTS)")
    args = ap.parse_args(argv)
    given = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None

    run = RunDir(args.run_dir).require()
    config = load_config(run)
    method = get_method(config.method)
    grids = list(tuning.GRIDS[config.method])
    names = tuning.setting_names(grids)
    load = lambda c: method.load(run, c, progress=False)  # noqa: E731
    t0 = time.perf_counter()
    mix = tuning.validation_split(config.data, seeds=given)
    if mix is None:
        raise SystemExit(f"{run.root} holds out no validation images")
    real = not any(synthetic_origin(s) for s in mix.samples)  # the user's defects: no earlier ones to compare
    earlier = mix if real else load_validation_split(config.data, SyntheticAnomalies(("perlin", "paste")),
                                                     progress=False)
    chosen_config, rows, rule = tuning.search(config, load, grids, mix, progress=False)
    print(f"validation (mix, {len(mix.labels)} images) done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    earlier_rows = rows if real else tuning.search(config, load, grids, earlier, progress=False)[1]
    print(f"validation (earlier defects) done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    _, test_rows, _ = tuning.search(config, load, grids, load_test_split(config.data, progress=False), progress=False)
    print(f"test done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def test_of(index: int) -> dict:
        return {k: test_rows[index][k] for k in (*names, *FIELDS)}

    def best(values: list) -> int:
        return int(np.argmax([-np.inf if v is None else v for v in values]))

    chosen = [tuning.current_values(chosen_config, names) == {k: r[k] for k in names} for r in rows].index(True)
    # the first form of the rule, for comparison: the gain against its spread over seeds (not its standard error)
    # (real validation defects, the user's: no seeds, both rules take the best)
    by_spread = chosen
    if "seeds" in rows[0]:
        per_seed = np.array([[r["seeds"][k]["objective"] for k in r["seeds"]] for r in rows])
        gain = per_seed[rule["best_on_mean"]] - per_seed[0]
        by_spread = rule["best_on_mean"] if gain.mean() > gain.std(ddof=1) else 0
    oracle = best([t["objective"] for t in test_rows])
    out = {"run": str(run.root), "method": config.method, "names": names, "seeds": rule["seeds"],
           "date": date.today().isoformat(), "command": " ".join(sys.argv),
           "validation_images": {"mix": int(len(mix.labels)), "earlier": int(len(earlier.labels))},
           "rank_agreement": agreements(rows, test_rows),
           "rank_agreement_earlier": agreements(earlier_rows, test_rows)["mix"],
           "choices": {"current settings": test_of(0),
                       "robust rule on the mix (ddad tune)": test_of(chosen),
                       "first rule: gain > spread over seeds": test_of(by_spread),
                       "best on the mix": test_of(best([r["objective"] for r in rows])),
                       "best on the earlier defects": test_of(best([r["objective"] for r in earlier_rows])),
                       "oracle (best on test)": test_of(oracle)},
           "rule": rule, "validation_rows": rows, "earlier_rows": earlier_rows, "test_rows": test_rows,
           "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(report(out))


def report(out: dict) -> str:
    lines = ["| validation defects | rank agreement: objective | image AUROC | pixel AUROC |", "|---|---|---|---|"]
    for view, values in [("earlier (perlin, paste; 1 seed)", out["rank_agreement_earlier"]),
                         *out["rank_agreement"].items()]:
        lines.append(f"| {view} | {' | '.join(fmt(values[f]) for f in FIELDS)} |")
    lines += ["", "| choice | settings | test image AUROC | test pixel AUROC | objective |", "|---|---|---|---|---|"]
    for label, row in out["choices"].items():
        settings = ", ".join(f"{k}={row[k]}" for k in out["names"])
        lines.append(f"| {label} | {settings} | {fmt(row['image_auroc'])} | {fmt(row['pixel_auroc'])} | "
                     f"{fmt(row['objective'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
