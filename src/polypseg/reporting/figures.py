"""The report's figures, drawn with matplotlib's object API (Agg, no pyplot state, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from polypseg.metrics.segmentation import precision_recall_from_histograms, roc_curve_from_histograms

if TYPE_CHECKING:
    from polypseg.reporting.cases import Case

GT_COLOUR = "#00e05a"
PRED_COLOUR = "#ff3df5"
FOLD_COLOURS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def save_png(figure: Figure, path: Path | str, dpi: int = 100) -> bytes:
    """Write ``figure`` as PNG to ``path`` and return the bytes (for embedding)."""
    buffer = io.BytesIO()
    # no "Software" tag: it carries a URL, and the report promises none
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    data = buffer.getvalue()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _colour(fold: int) -> str:
    return FOLD_COLOURS[fold % len(FOLD_COLOURS)]


def training_curves(histories: Mapping[int, Sequence[Mapping[str, float]]]) -> Figure:
    """Loss (train solid, validation dashed) and validation Dice per epoch, one colour per fold."""
    has_val = any("val_dice" in r for h in histories.values() for r in h)
    figure = Figure(figsize=(11, 3.8) if has_val else (6, 3.8))
    axes = figure.subplots(1, 2 if has_val else 1, squeeze=False)[0]
    for fold, history in sorted(histories.items()):
        marker = "o" if len(history) < 40 else None  # short runs: make single epochs visible
        epochs = [r["epoch"] for r in history]
        axes[0].plot(
            epochs,
            [r["train_loss"] for r in history],
            color=_colour(fold),
            marker=marker,
            markersize=3,
            label=f"fold {fold} train",
        )
        if any("val_loss" in r for r in history):
            val = [(r["epoch"], r["val_loss"]) for r in history if "val_loss" in r]
            axes[0].plot(
                *zip(*val, strict=False),
                color=_colour(fold),
                linestyle="--",
                marker=marker,
                markersize=3,
                label=f"fold {fold} val",
            )
        if has_val:
            dice = [(r["epoch"], r["val_dice"]) for r in history if "val_dice" in r]
            if dice:
                axes[1].plot(
                    *zip(*dice, strict=False), color=_colour(fold), marker=marker, markersize=3, label=f"fold {fold}"
                )
    axes[0].set(xlabel="epoch", ylabel="loss", title="Loss")
    axes[0].legend(fontsize=7, ncol=2)
    axes[0].grid(alpha=0.3)
    if has_val:
        axes[1].set(xlabel="epoch", ylabel="Dice @ 0.5", title="Validation Dice (inner validation split)")
        axes[1].legend(fontsize=7)
        axes[1].grid(alpha=0.3)
    figure.tight_layout()
    return figure


def threshold_sweep(pooled_at: Mapping[str, Mapping[str, float]], chosen: float) -> Figure:
    """Dice, IoU, sensitivity and precision of the pooled out-of-fold predictions vs threshold."""
    thresholds = sorted(float(t) for t in pooled_at)
    figure = Figure(figsize=(6.5, 4))
    ax = figure.subplots()
    for name, style in (("dice", "-o"), ("iou", "-s"), ("sensitivity", "--^"), ("precision", "--v")):
        ax.plot(thresholds, [pooled_at[f"{t:g}"][name] for t in thresholds], style, markersize=4, label=name)
    ax.axvline(chosen, color="black", linewidth=1.2, label=f"chosen {chosen:g}")
    if abs(chosen - 0.5) > 1e-9:
        ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":", label="0.5")
    ax.set(xlabel="threshold", ylabel="score", title="Threshold sweep (pooled out-of-fold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def roc_pr_curves(positive: np.ndarray, negative: np.ndarray, auc: float, average_precision: float) -> Figure:
    """Pixel-level ROC and precision-recall curves from probability histograms."""
    fpr, tpr = roc_curve_from_histograms(positive, negative)
    recall, precision = precision_recall_from_histograms(positive, negative)
    figure = Figure(figsize=(10, 4))
    roc, pr = figure.subplots(1, 2)
    roc.plot(fpr, tpr, label=f"AUC = {auc:.4f}")
    roc.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="Pixel ROC", xlim=(0, 1), ylim=(0, 1.01))
    roc.legend(loc="lower right")
    pr.plot(recall, precision, label=f"AP = {average_precision:.4f}")
    prevalence = positive.sum() / max(1, positive.sum() + negative.sum())
    pr.axhline(prevalence, color="grey", linewidth=0.8, linestyle=":", label=f"prevalence {prevalence:.3f}")
    pr.set(xlabel="recall", ylabel="precision", title="Pixel precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    pr.legend(loc="lower left")
    for ax in (roc, pr):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def fold_boxplots(values: Mapping[str, Mapping[int, np.ndarray]], threshold: float) -> Figure:
    """One panel per metric: a box of per-image scores for each fold."""
    names = list(values)
    figure = Figure(figsize=(3.6 * len(names), 3.8))
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=False):
        folds = sorted(values[name])
        data = [np.asarray(values[name][f], dtype=np.float64) for f in folds]
        data = [d[np.isfinite(d)] for d in data]
        boxes = ax.boxplot(data, showmeans=True, patch_artist=True, medianprops={"color": "black"})
        ax.set_xticks(range(1, len(folds) + 1), [str(f) for f in folds])
        for patch, fold in zip(boxes["boxes"], folds, strict=False):
            patch.set_facecolor(_colour(fold))
            patch.set_alpha(0.45)
        ax.set(xlabel="fold", title=f"{name} per image @ {threshold:g}", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return figure


def _overlay(ax, case: Case, heatmap: bool = True) -> None:
    if case.image is not None:
        ax.imshow(case.image)
    else:
        ax.imshow(np.zeros(case.mask.shape), cmap="gray", vmin=0, vmax=1)
    if heatmap and case.heatmap is not None:
        ax.imshow(case.heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    if case.mask.any():
        ax.contour(case.mask, levels=[0.5], colors=GT_COLOUR, linewidths=1.2)
    if case.pred.any():
        ax.contour(case.pred, levels=[0.5], colors=PRED_COLOUR, linewidths=1.0, linestyles="--")
    ax.set_xticks([])
    ax.set_yticks([])


def case_gallery(groups: Mapping[str, Sequence[Case]]) -> Figure:
    """Rows of cases (e.g. best / median / worst): image, Grad-CAM overlay, ground truth and prediction contours."""
    columns = max(len(c) for c in groups.values())
    figure = Figure(figsize=(2.6 * columns, 2.9 * len(groups)))
    axes = figure.subplots(len(groups), columns, squeeze=False)
    for row, (label, cases) in enumerate(groups.items()):
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(cases):
                ax.axis("off")
                continue
            case = cases[col]
            _overlay(ax, case)
            ax.set_title(
                f"{case.stem[:14]} (fold {case.fold})\nDice {case.dice:.3f}  BF1 {case.boundary_f1:.3f}", fontsize=8
            )
            if col == 0:
                ax.set_ylabel(label, fontsize=11)
    figure.tight_layout()
    return figure


def worst_cases(cases: Sequence[Case]) -> Figure:
    """One row per case: image, ground truth, prediction (probability with mask contour), heatmap overlay."""
    titles = ("image", "ground truth", "prediction", "Grad-CAM")
    figure = Figure(figsize=(10.5, 2.7 * len(cases)))
    axes = figure.subplots(len(cases), 4, squeeze=False)
    for row, case in enumerate(cases):
        image_ax, gt_ax, pred_ax, cam_ax = axes[row]
        if case.image is not None:
            image_ax.imshow(case.image)
        else:
            image_ax.text(0.5, 0.5, "image not\navailable", ha="center", va="center", transform=image_ax.transAxes)
        gt_ax.imshow(case.mask, cmap="gray", vmin=0, vmax=1)
        pred_ax.imshow(case.prob, cmap="magma", vmin=0, vmax=1)
        if case.pred.any():
            pred_ax.contour(case.pred, levels=[0.5], colors=PRED_COLOUR, linewidths=1.0)
        if case.mask.any():
            pred_ax.contour(case.mask, levels=[0.5], colors=GT_COLOUR, linewidths=1.0, linestyles="--")
        if case.heatmap is not None:
            _overlay(cam_ax, case)
        else:
            cam_ax.text(0.5, 0.5, "heatmap not\navailable", ha="center", va="center", transform=cam_ax.transAxes)
        for ax, title in zip(axes[row], titles, strict=False):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=10)
        image_ax.set_ylabel(
            f"{case.stem[:16]}\nfold {case.fold}\nDice {case.dice:.3f}\nBF1 {case.boundary_f1:.3f}", fontsize=8
        )
    figure.tight_layout()
    return figure
