"""``ddad report``: one self-contained HTML page per evaluated run (opens from disk, no network).

It reads what ``ddad test`` wrote (metrics.json, scores.csv, curves.json, images/) and shows the
metrics table, the image ROC and PRO curves, the score histogram of good vs defective images with the
threshold, and the test images with input, reconstruction, heatmap and ground truth, worst errors
first (missed defects, then false alarms). Plots are inline SVG; images are copied next to the page.
"""

from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_text
from .metrics import roc_points, thin
from .results import SplitMetrics, TestMetrics, image_panel_name
from .runs import RunDir


def _svg_curve(xs: list, ys: list, title: str, xlabel: str, ylabel: str, xmax: float = 1.0,
               diagonal: bool = False, w: int = 360, h: int = 280) -> str:
    m = 44
    pw, ph = w - m - 12, h - m - 24

    def px(x):
        return m + pw * min(x, xmax) / xmax

    def py(y):
        return 20 + ph * (1 - y)

    pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys) if x <= xmax + 1e-12)
    grid = "".join(f'<line x1="{m}" y1="{py(t):.1f}" x2="{m + pw}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{m - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>' for t in (0, 0.5, 1))
    ticks = "".join(f'<text x="{px(t):.1f}" y="{20 + ph + 16}" text-anchor="middle">{t:g}</text>'
                    for t in (0, xmax / 2, xmax))
    diag = f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(xmax)}" y2="{py(xmax)}" class="diag"/>' if diagonal else ""
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">'
            f'<text x="{w / 2}" y="13" text-anchor="middle" class="title">{html.escape(title)}</text>{grid}{ticks}{diag}'
            f'<rect x="{m}" y="20" width="{pw}" height="{ph}" class="frame"/>'
            f'<polyline points="{pts}" class="curve"/>'
            f'<text x="{m + pw / 2}" y="{h - 4}" text-anchor="middle">{html.escape(xlabel)}</text>'
            f'<text x="12" y="{20 + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {20 + ph / 2})">'
            f'{html.escape(ylabel)}</text></svg>')


def _svg_histogram(good: np.ndarray, bad: np.ndarray, threshold: float | None, w: int = 420, h: int = 280) -> str:
    allv = np.concatenate([good, bad]) if len(bad) else good
    lo, hi = float(allv.min()), float(allv.max())
    hi = hi if hi > lo else lo + 1.0
    bins = np.linspace(lo, hi, 31)
    cg, _ = np.histogram(good, bins)
    cb, _ = np.histogram(bad, bins)
    top = max(int(cg.max(initial=0)), int(cb.max(initial=0)), 1)
    m, pw, ph = 36, w - 48, h - 64
    bw = pw / (len(bins) - 1)
    bars = []
    for i in range(len(bins) - 1):
        for counts, cls in ((cg, "good"), (cb, "bad")):
            bh = ph * counts[i] / top
            bars.append(f'<rect x="{m + i * bw:.1f}" y="{20 + ph - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                        f'class="{cls}"/>')
    ticks = "".join(f'<line x1="{m + pw * k / 4:.1f}" y1="{20 + ph}" x2="{m + pw * k / 4:.1f}" y2="{20 + ph + 4}" '
                    f'class="frame"/><text x="{m + pw * k / 4:.1f}" y="{20 + ph + 16}" '
                    f'text-anchor="{("start", "middle", "middle", "middle", "end")[k]}">{lo + (hi - lo) * k / 4:.3g}'
                    f'</text>' for k in range(5))
    thr = ""
    if threshold is not None:
        tx = m + pw * (threshold - lo) / (hi - lo)
        thr = (f'<line x1="{tx:.1f}" y1="18" x2="{tx:.1f}" y2="{20 + ph}" class="thr"/>'
               f'<text x="{tx + 4:.1f}" y="30">threshold {threshold:.4g}</text>')
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="score histogram">'
            f'<text x="{w / 2}" y="13" text-anchor="middle" class="title">Image scores</text>'
            f'{"".join(bars)}{thr}<rect x="{m}" y="20" width="{pw}" height="{ph}" class="frame"/>'
            f'{ticks}'
            f'<rect x="{m}" y="{h - 18}" width="10" height="10" class="good"/><text x="{m + 14}" y="{h - 9}">good</text>'
            f'<rect x="{m + 70}" y="{h - 18}" width="10" height="10" class="bad"/>'
            f'<text x="{m + 84}" y="{h - 9}">defective</text></svg>')


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} .sub{color:#666;font-size:13px}
table.metrics{border-collapse:collapse;margin:12px 0} table.metrics td,table.metrics th{border:1px solid #ccc;
padding:6px 12px;text-align:right} table.metrics th{background:#f3f3f3}
.plots{display:flex;flex-wrap:wrap;gap:16px} svg{background:#fff;border:1px solid #e3e3e3;font-size:11px}
svg .title{font-weight:600;font-size:12px} .grid{stroke:#eee} .frame{fill:none;stroke:#999} .diag{stroke:#bbb;
stroke-dasharray:4 3} .curve{fill:none;stroke:#1f6fb4;stroke-width:2} .good{fill:#4c9be8;opacity:.75}
.bad{fill:#e8674c;opacity:.75} .thr{stroke:#222;stroke-dasharray:5 3}
.item{margin:10px 0;padding:6px;border-left:5px solid #ccc} .item.fn{border-color:#d62728}
.item.fp{border-color:#ff9f1c} .item.ok{border-color:#2ca02c} .item img{max-width:100%;image-rendering:pixelated}
.tag{display:inline-block;font-size:12px;padding:1px 6px;border-radius:3px;color:#fff;margin-right:6px}
.settings td{padding:1px 10px;font-size:12px} .note{color:#7a4b00;background:#fff6e0;padding:6px 10px;
max-width:900px} .tag.fn{background:#d62728} .tag.fp{background:#ff9f1c} .tag.ok{background:#2ca02c}
"""


def _flat(tree, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in _flat(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), tree)]


def _metrics_table(metrics: TestMetrics) -> str:
    def f(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def row(name: str, m: SplitMetrics, extra: str = "") -> str:
        return (f"<tr><th>{html.escape(name)}</th><td>{f(m.image_auroc)}</td><td>{f(m.pixel_auroc)}</td>"
                f"<td>{f(m.pro)}</td><td>{m.n_images}</td><td>{m.n_defective}</td>{extra}</tr>")

    threshold = metrics.threshold
    own = metrics.info.get("category_thresholds") or {}
    rows = [row("all images", metrics.overall, f"<td>{'n/a' if threshold is None else f'{threshold:.4g}'}"
                                               f"{' (shared)' if own else ''}</td>")]
    if len(metrics.categories) > 1:
        rows += [row(name, m, f"<td>{own[name]:.4g}</td>" if name in own else "<td></td>")
                 for name, m in metrics.categories.items()]
        rows.append(row("mean of categories", metrics.mean, "<td></td>"))
    return ("<table class='metrics'><tr><th></th><th>image AUROC</th><th>pixel AUROC</th><th>PRO (FPR ≤ 0.3)</th>"
            f"<th>images</th><th>defective</th><th>threshold ({html.escape(metrics.threshold_source or 'stored')})"
            f"</th></tr>{''.join(rows)}</table>")


def _outcome(score: float, label: int, threshold: float | None) -> tuple[float, str]:
    """(badness, kind): missed defects first (furthest below the threshold first), then false alarms
    (furthest above first), then correct images (closest to the threshold first)."""
    if threshold is None:
        return -score, "ok"
    if label == 1 and score < threshold:
        return 2e9 + (threshold - score), "fn"
    if label == 0 and score >= threshold:
        return 1e9 + (score - threshold), "fp"
    return -abs(score - threshold), "ok"


def write_report(run: RunDir, test_dir: Path | None = None, out_dir: Path | None = None) -> Path:
    """Write ``out_dir``/index.html (default RUN_DIR/report) from a ``ddad test`` output folder."""
    test_dir = Path(test_dir) if test_dir else run.test_dir
    out_dir = Path(out_dir) if out_dir else run.root / "report"
    metrics_path = test_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: run `ddad test {run.root}` first")
    metrics = TestMetrics.load(metrics_path)
    rows = list(csv.DictReader(open(test_dir / "scores.csv", newline="")))
    curves = json.loads((test_dir / "curves.json").read_text()) if (test_dir / "curves.json").is_file() else {}
    scores = np.array([float(r["score"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    threshold = metrics.threshold
    # each image's own threshold (its category's, where the run chose one per category)
    limits = [float(r["threshold"]) if r.get("threshold") else threshold for r in rows]
    categories = list(dict.fromkeys(r.get("category", "") for r in rows))
    several = len(categories) > 1

    def f(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    settings = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in _flat(metrics.settings) + _flat(metrics.info))
    plots = []
    if labels.min(initial=0) != labels.max(initial=0):
        fpr, tpr = roc_points(scores, labels)
        xs, ys = thin(fpr, tpr)
        plots.append(_svg_curve(xs, ys, f"Image ROC (AUROC {f(metrics.overall.image_auroc)})", "false positive rate",
                                "true positive rate", diagonal=True))
    if curves.get("pro"):
        plots.append(_svg_curve(curves["pro"]["fpr"], curves["pro"]["pro"],
                                f"PRO curve (PRO {f(metrics.overall.pro)})", "false positive rate",
                                "per-region overlap", xmax=0.3))
    plots.append(_svg_histogram(scores[labels == 0], scores[labels == 1], threshold))

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    names = {"fn": "missed defect", "fp": "false alarm", "ok": "correct"}
    sections, counts = [], {"fn": 0, "fp": 0}
    for category in categories:
        items = sorted(((*_outcome(s_, y, t), r) for r, s_, y, t in zip(rows, scores, labels, limits)
                        if r.get("category", "") == category), key=lambda t: -t[0])
        blocks = []
        for _, kind, r in items:
            counts[kind] = counts.get(kind, 0) + 1
            src = test_dir / "images" / (image_panel_name(category if several else "", r["defect_type"], r["image"])
                                         + ".png")
            img = ""
            if src.is_file():
                shutil.copyfile(src, out_dir / "images" / src.name)
                img = f"<img src='images/{html.escape(src.name)}' alt='{html.escape(r['image'])}' loading='lazy'>"
            blocks.append(f"<div class='item {kind}'><span class='tag {kind}'>{names[kind]}</span>"
                          f"<b>{html.escape(r['defect_type'])}</b> {html.escape(Path(r['image']).name)} — score "
                          f"{float(r['score']):.4g}<br>{img}</div>")
        heading = f"<h3>{html.escape(category)}</h3>" if several else ""
        sections.append(heading + "".join(blocks))
    notes = []
    if threshold is not None and "test split" in (metrics.threshold_source or ""):
        notes.append(f"The threshold was chosen {html.escape(metrics.threshold_source)}: the counts of missed defects "
                     "and false alarms below are measured on the same images it was fitted to, so they are "
                     "optimistic.")
    elif threshold is not None:
        notes.append(f"The threshold was chosen {html.escape(metrics.threshold_source)}, before any test image was "
                     "read: the counts of missed defects and false alarms below are what it does on unseen images.")
    for warning in metrics.info.get("undertrained") or ():
        notes.append(f"Warning: {html.escape(warning)}.")
    sizes = metrics.info.get("original_sizes") or {}
    size = metrics.info.get("image_size")
    stretched = [s for s in sizes if len(set(s.split("x"))) > 1]
    if size and stretched:
        notes.append(f"The test images are {', '.join(stretched[:3])} pixels; the model sees them resized to "
                     f"{size} x {size} without keeping the aspect ratio, and so do the panels below.")
    notes_html = "".join(f"<p class='note'>{n}</p>" for n in notes)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ddad report — "
            f"{html.escape(metrics.dataset)}</title><style>{_CSS}</style></head><body>"
            f"<h1>ddad report — {html.escape(metrics.dataset)}</h1>"
            f"<div class='sub'>run {html.escape(str(run.root))}</div>{_metrics_table(metrics)}"
            f"<details><summary>settings</summary><table class='settings'>{settings}</table></details>"
            f"<h2>Curves</h2><div class='plots'>{''.join(plots)}</div>"
            f"<h2>Test images ({counts['fn']} missed defect{'' if counts['fn'] == 1 else 's'}, {counts['fp']} "
            f"false alarm{'' if counts['fp'] == 1 else 's'} at the threshold; worst "
            f"first{', by category' if several else ''})</h2>{notes_html}{''.join(sections)}</body></html>")
    atomic_write_text(out_dir / "index.html", page)
    return out_dir / "index.html"
