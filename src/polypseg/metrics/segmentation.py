"""Segmentation metrics: plain functions plus an accumulator (MONAI's pattern).

Conventions, stated once here and in docs:

* Dice and IoU are computed per image and then averaged over images (the polyp literature's
  convention). An image where both prediction and ground truth are empty scores 1.
* Sensitivity and precision are pixel-level, pooled over all images of the set (micro average).
* Pixel AUC-ROC is computed from histograms of the probabilities (``bins`` equal-width bins on
  [0, 1]), so it can stream over batches; it is exact for probabilities quantised to those bins,
  ties counting one half. Otherwise pixels sharing a bin count as ties, which moves the AUC by up
  to half the share of positive-negative pixel pairs in a common bin: not bounded by 1/bins, and
  large for a saturated model whose missed polyp pixels share the lowest bin with the background.
  :func:`roc_auc_exact` gives the exact value for a set held in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.30 + 0.05 * i, 2) for i in range(9))
METRIC_NAMES = ("dice", "iou", "auc", "sensitivity", "precision")


def _flat_bool(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        x = x.unsqueeze(0)
    return x.reshape(x.shape[0], -1).bool()


def confusion(
    pred: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image ``(tp, fp, fn, tn)`` pixel counts for binary masks shaped ``(N, ...)`` or ``(H, W)``."""
    p, t = _flat_bool(pred), _flat_bool(target)
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    tn = (~p & ~t).sum(1)
    return tp, fp, fn, tn


def dice_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Dice of binary masks; 1 where both are empty."""
    tp, fp, fn, _ = confusion(pred, target)
    denominator = 2 * tp + fp + fn
    return torch.where(
        denominator == 0, torch.ones_like(tp, dtype=torch.float64), 2 * tp / denominator.clamp(min=1).double()
    )


def iou_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image IoU (Jaccard) of binary masks; 1 where both are empty."""
    tp, fp, fn, _ = confusion(pred, target)
    union = tp + fp + fn
    return torch.where(union == 0, torch.ones_like(tp, dtype=torch.float64), tp / union.clamp(min=1).double())


def probability_histograms(
    probs: torch.Tensor, target: torch.Tensor, bins: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of positive and negative pixels in ``bins`` equal-width probability bins on [0, 1]."""
    index = (probs.detach().float().clamp(0, 1) * bins).long().clamp(max=bins - 1).reshape(-1)
    positive = target.reshape(-1).bool()
    pos = torch.bincount(index[positive], minlength=bins)
    neg = torch.bincount(index[~positive], minlength=bins)
    return pos.cpu().numpy().astype(np.int64), neg.cpu().numpy().astype(np.int64)


def roc_curve_from_histograms(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` points, thresholds descending from the top bin, starting at (0, 0)."""
    tps = np.concatenate([[0], np.cumsum(pos[::-1])])
    fps = np.concatenate([[0], np.cumsum(neg[::-1])])
    tpr = tps / max(tps[-1], 1)
    fpr = fps / max(fps[-1], 1)
    return fpr, tpr


def roc_auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal: pixels in the same bin count as ties)."""
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    fpr, tpr = roc_curve_from_histograms(pos, neg)
    return float(np.trapezoid(tpr, fpr))


def roc_auc_exact(probs: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float:
    """Exact pixel AUC-ROC of a set held in memory (scikit-learn; only equal probabilities tie).

    The accumulator's histogram AUC streams over batches but ties every pixel pair sharing a bin;
    this one needs all pixels at once (about 80 bytes a pixel while it sorts: 1 GB for 200 images
    at 256 px). NaN when the set has only one class, or a probability is not finite (a diverged
    model: scikit-learn would raise and stop the fold's evaluation).
    """
    from sklearn.metrics import roc_auc_score

    if isinstance(probs, torch.Tensor):
        probs = probs.detach().float().cpu().numpy()
    if isinstance(target, torch.Tensor):
        target = target.detach().cpu().numpy()
    labels = np.asarray(target).reshape(-1).astype(bool)
    scores = np.asarray(probs, dtype=np.float32).reshape(-1)
    if labels.all() or not labels.any() or not np.isfinite(scores).all():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def precision_recall_from_histograms(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(recall, precision)`` points from the top bin down."""
    tps = np.cumsum(pos[::-1]).astype(np.float64)
    fps = np.cumsum(neg[::-1]).astype(np.float64)
    precision = np.divide(tps, tps + fps, out=np.ones_like(tps), where=(tps + fps) > 0)
    recall = tps / max(tps[-1], 1)
    return recall, precision


@dataclass
class SegmentationMetrics:
    """Accumulates per-image Dice/IoU and pooled pixel counts at several thresholds.

    >>> metric = SegmentationMetrics()
    >>> metric.update(probs, masks, stems)   # probs in [0, 1], (N, H, W) or (N, 1, H, W)
    >>> metric.compute()["at"]["0.5"]["dice"]
    """

    thresholds: Sequence[float] = (0.5,) + DEFAULT_THRESHOLDS
    bins: int = 1000
    stems: list[str] = field(default_factory=list)
    _dice: dict[float, list[np.ndarray]] = field(default_factory=dict)
    _iou: dict[float, list[np.ndarray]] = field(default_factory=dict)
    _counts: dict[float, np.ndarray] = field(default_factory=dict)
    _pos: np.ndarray | None = None
    _neg: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.thresholds = tuple(sorted({round(float(t), 4) for t in self.thresholds}))
        self.reset()

    def reset(self) -> None:
        self.stems = []
        self._dice = {t: [] for t in self.thresholds}
        self._iou = {t: [] for t in self.thresholds}
        self._counts = {t: np.zeros(3, dtype=np.int64) for t in self.thresholds}  # tp, fp, fn
        self._pos = np.zeros(self.bins, dtype=np.int64)
        self._neg = np.zeros(self.bins, dtype=np.int64)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor, stems: Sequence[str] | None = None) -> None:
        if probs.dim() == 4:
            probs = probs[:, 0]
        if target.dim() == 4:
            target = target[:, 0]
        if probs.dim() == 2:
            probs, target = probs[None], target[None]
        target = target.bool()
        for t in self.thresholds:
            pred = probs >= t
            tp, fp, fn, _ = confusion(pred, target)
            self._dice[t].append(dice_score(pred, target).cpu().numpy())
            self._iou[t].append(iou_score(pred, target).cpu().numpy())
            self._counts[t] += np.array([int(tp.sum()), int(fp.sum()), int(fn.sum())])
        pos, neg = probability_histograms(probs, target, self.bins)
        self._pos += pos
        self._neg += neg
        self.stems.extend(stems if stems is not None else [str(len(self.stems) + i) for i in range(probs.shape[0])])

    def per_image(self, threshold: float) -> dict[str, np.ndarray]:
        t = round(float(threshold), 4)
        return {"dice": np.concatenate(self._dice[t]), "iou": np.concatenate(self._iou[t])}

    def at_threshold(self, threshold: float) -> dict[str, float]:
        t = round(float(threshold), 4)
        tp, fp, fn = (int(v) for v in self._counts[t])
        scores = self.per_image(t)
        return {
            "dice": float(scores["dice"].mean()),
            "iou": float(scores["iou"].mean()),
            "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "auc": self.auc(),
        }

    def auc(self) -> float:
        assert self._pos is not None and self._neg is not None
        return roc_auc_from_histograms(self._pos, self._neg)

    @property
    def histograms(self) -> tuple[np.ndarray, np.ndarray]:
        assert self._pos is not None and self._neg is not None
        return self._pos.copy(), self._neg.copy()

    def best_threshold(
        self, candidates: Sequence[float] = DEFAULT_THRESHOLDS, images: np.ndarray | None = None
    ) -> float:
        """The candidate with the highest mean Dice (ties: the one closest to 0.5, then the higher).

        ``images``: a boolean mask over the images seen, to choose on those only.
        """
        dice = {t: self.per_image(t)["dice"] for t in candidates}
        # Rounded: in floats 0.45 is nearer 0.5 than 0.55 is, but 0.6 no nearer than 0.4.
        scored = [
            (float((d if images is None else d[images]).mean()), -round(abs(t - 0.5), 9), t) for t, d in dice.items()
        ]
        return max(scored)[2]

    def compute(self) -> dict[str, Any]:
        """All thresholds' metrics, keyed by the threshold as a string (``"0.5"``)."""
        return {"n_images": len(self.stems), "at": {f"{t:g}": self.at_threshold(t) for t in self.thresholds}}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, as reported across folds).

    The spread of a single value is undefined, not 0: it comes back as NaN (shown as "n/a", stored
    as null), so one finished fold is never reported as "± 0.0000".
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else float("nan")


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-image ``values`` (images resampled with replacement).

    Seeded, so a report is reproducible. Fewer than two values have no interval (NaN, NaN).
    """
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks keep memory at 1000 x n
        stop = min(resamples, start + 1000)
        means[start:stop] = array[rng.integers(0, array.size, (stop - start, array.size))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)
