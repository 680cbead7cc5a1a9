"""Exact evaluation metrics: image AUROC, pixel AUROC and PRO (paper Sec. 5.1).

* AUROC is the probability that a random defective sample scores above a random good one (ties
  count one half), i.e. the area under the full ROC curve over every threshold.
* Pixel AUROC is the same over all pixels. It is computed from the sorted defect-pixel scores and a
  pass over the good pixels in chunks, so memory beyond the maps is O(#defect pixels).
* PRO (Bergmann et al. 2020): for a threshold, the mean over ground-truth regions (8-connected
  components of each mask) of the fraction of the region above the threshold, against the false
  positive rate over all good pixels. The curve is traced through *every* distinct score value
  (not 200 sampled thresholds), integrated with the trapezoid rule up to FPR 0.3 and divided by 0.3,
  so a perfect map scores 1.

:func:`evaluate` computes all three for a set of test images (the ``ddad test`` figures).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def roc_auc(scores, labels) -> float | None:
    """Exact AUROC (Mann-Whitney U with midranks); None when only one class is present."""
    s = _as_numpy(scores).astype(np.float64).ravel()
    y = _as_numpy(labels).astype(bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pixel_auroc(maps, masks, chunk: int = 1 << 22) -> float | None:
    """Exact AUROC over all pixels of ``maps`` (N, H, W) against binary ``masks`` (N, H, W)."""
    s = _as_numpy(maps).astype(np.float32, copy=False).ravel()
    y = _as_numpy(masks).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"maps and masks differ in size: {s.shape} vs {y.shape}")
    pos = np.sort(s[y])
    n_pos, n_neg = pos.size, s.size - pos.size
    if n_pos == 0 or n_neg == 0:
        return None
    greater, ties = 0, 0
    neg_idx = np.flatnonzero(~y)
    for start in range(0, neg_idx.size, chunk):
        neg = np.sort(s[neg_idx[start:start + chunk]])  # sorted queries: numpy's search reuses the last bound
        right = np.searchsorted(pos, neg, side="right")
        left = np.searchsorted(pos, neg, side="left")
        greater += int((n_pos - right).sum())
        ties += int((right - left).sum())
    return float((greater + 0.5 * ties) / (n_pos * n_neg))


def label_regions(masks) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel region id (0 = good; ids unique across images) and each region's size (index = id)."""
    m = _as_numpy(masks).astype(bool)
    regions = np.zeros(m.shape, dtype=np.int64)
    next_id = 0
    for i in range(m.shape[0]):
        lab, count = ndimage.label(m[i], structure=EIGHT_CONNECTED)
        regions[i] = np.where(lab > 0, lab + next_id, 0)
        next_id += count
    sizes = np.bincount(regions.ravel(), minlength=next_id + 1)
    return regions, sizes


def pro_curve(maps, masks, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, pro) at every distinct threshold down to the first one whose FPR reaches ``fpr_limit``,
    starting at (0, 0). None when there is no defect region or no good pixel."""
    s = _as_numpy(maps).astype(np.float64).ravel()
    regions, sizes = label_regions(masks)
    regions = regions.ravel()
    if s.shape != regions.shape:
        raise ValueError(f"maps and masks differ in size: {s.shape} vs {regions.shape}")
    n_regions = sizes.size - 1
    neg = regions == 0
    n_neg = int(neg.sum())
    if n_regions == 0 or n_neg == 0:
        return None
    # Only pixels at or above the threshold where FPR first reaches the limit can matter.
    k = min(n_neg, int(np.ceil(fpr_limit * n_neg)))
    neg_scores = s[neg]
    floor = np.partition(neg_scores, n_neg - k)[n_neg - k]
    keep = s >= floor
    s_k, r_k = s[keep], regions[keep]
    weight_fpr = np.where(r_k == 0, 1.0 / n_neg, 0.0)
    weight_pro = np.where(r_k > 0, 1.0 / (sizes[r_k] * n_regions), 0.0)
    order = np.argsort(-s_k, kind="stable")
    s_sorted = s_k[order]
    fpr = np.cumsum(weight_fpr[order])
    pro = np.cumsum(weight_pro[order])
    # One point per distinct score: the last index of each tie group.
    ends = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
    return np.concatenate([[0.0], fpr[ends]]), np.concatenate([[0.0], pro[ends]])


def pro_auc(maps, masks, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the PRO curve up to ``fpr_limit`` (1.0 for a perfect map)."""
    curve = pro_curve(maps, masks, fpr_limit)
    if curve is None:
        return None
    return float(area_up_to(curve[0], curve[1], fpr_limit) / fpr_limit)


def area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x, y), x non-decreasing, from x[0] to ``limit``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    if xs[-1] < limit and inside.sum() < x.size:
        j = int(np.argmax(~inside))  # first point beyond the limit
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.append(xs, limit), np.append(ys, y_lim)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def f1_optimal_threshold(scores, labels) -> float | None:
    """The score threshold (predict defective when score >= threshold) that maximises F1."""
    s = _as_numpy(scores).astype(np.float64).ravel()
    y = _as_numpy(labels).astype(bool).ravel()
    if y.sum() == 0 or (~y).sum() == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    ends = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
    precision = tp[ends] / (tp[ends] + fp[ends])
    recall = tp[ends] / y.sum()
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(s_sorted[ends[int(np.argmax(f1))]])


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    tp, fp = np.cumsum(y), np.cumsum(~y)
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    tpr = np.concatenate([[0.0], tp[ends] / max(y.sum(), 1)])
    fpr = np.concatenate([[0.0], fp[ends] / max((~y).sum(), 1)])
    return fpr, tpr


def thin(x: np.ndarray, y: np.ndarray, n: int = 400) -> tuple[list, list]:
    if len(x) <= n:
        return [float(v) for v in x], [float(v) for v in y]
    idx = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
    return [float(v) for v in x[idx]], [float(v) for v in y[idx]]


PRO_LIMIT = 0.3


def evaluate(scores, labels, maps, masks, has_masks: bool = True, curves: dict | None = None) -> dict:
    """image AUROC, pixel AUROC and PRO (None where the data cannot give them) of images with ``scores``
    and ``labels``, anomaly ``maps`` (N, H, W) and ground-truth ``masks`` (N, H, W, bool). If ``curves``
    is a dict, the PRO curve (thinned to a few hundred points) is stored in it."""
    maps, masks = _as_numpy(maps), _as_numpy(masks)
    has_masks = has_masks and bool(masks.any())
    pro = None
    if has_masks:
        curve = pro_curve(maps, masks, PRO_LIMIT)
        if curve is not None:
            pro = area_up_to(curve[0], curve[1], PRO_LIMIT) / PRO_LIMIT
            if curves is not None:
                xs, ys = thin(*curve)
                curves["pro"] = {"fpr": xs, "pro": ys}
    return {"image_auroc": roc_auc(scores, labels), "pixel_auroc": pixel_auroc(maps, masks) if has_masks else None,
            "pro": pro}
