"""The summary of a cross-validation run, computed from its folder: a pure function of the run.

:func:`compute_summary` reads the run through :class:`~polypseg.core.runs.RunDir` and writes nothing;
:func:`polypseg.experiments.cv.summarize_run` writes its result into the run (``summary.{json,md}``), and a
report on a partial run computes it in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polypseg._version import __version__
from polypseg.core.runs import RunDir, RunError
from polypseg.metrics.segmentation import DEFAULT_THRESHOLDS, METRIC_NAMES, SegmentationMetrics, mean_std
from polypseg.training.evaluation import evaluate_probabilities

# PolypSeg-GradCAM (arXiv 2509.18159), Kvasir-SEG 5-fold CV, ImageNet-pretrained encoder.
PAPER_RESULTS = {
    "dice": (0.8902, 0.0115),
    "iou": (0.8023, 0.0147),
    "auc": (0.9722, 0.0031),
    "sensitivity": (0.9058, None),
    "precision": (0.9083, None),
    "threshold": 0.55,
}
THRESHOLD_SELECTION = "best mean Dice on pooled out-of-fold predictions, 0.30..0.70 step 0.05"


def compute_summary(
    run_dir: RunDir | Path | str,
    elapsed_s: float | None = None,
    wall_time_s: float | None = None,
    paused_s: float | None = None,
) -> tuple[dict[str, Any], SegmentationMetrics]:
    """Pool the finished folds' out-of-fold predictions and choose the threshold on them.

    Returns the summary (the content of ``summary.json``) and the pooled metrics (whose
    histograms are ``pooled_histograms.npz``). ``elapsed_s``: this invocation's time;
    ``wall_time_s``: the run's, summed over invocations; ``paused_s``: the time the run's processes
    were stopped (``kill -STOP``), which both leave out. Writes nothing.
    """
    run = RunDir(run_dir)
    settings = run.read_settings()
    if settings.kind != "cv":
        raise RunError(f"{run.path} is a single-split training folder, not a cross-validation run")
    stems, probs, masks, fold_ids = run.load_oof()
    pooled = evaluate_probabilities(probs, masks, stems)
    chosen = pooled.best_threshold(DEFAULT_THRESHOLDS)
    fold_ids_array = np.array(fold_ids)
    crossfit = cross_fitted_thresholds(pooled, fold_ids_array, DEFAULT_THRESHOLDS)
    per_fold = []
    for fold in sorted(set(fold_ids)):
        rows = torch.from_numpy(np.flatnonzero(fold_ids_array == fold))
        own = crossfit.get(fold)
        thresholds = (0.5, chosen) if own is None else (0.5, chosen, own)
        fold_metric = evaluate_probabilities(probs[rows], masks[rows], thresholds=thresholds)
        entry: dict[str, Any] = {
            "fold": fold,
            "n_test": int(rows.numel()),
            "at_0.5": fold_metric.at_threshold(0.5),
            "at_chosen": fold_metric.at_threshold(chosen),
        }
        if own is not None:
            entry["crossfit_threshold"] = own
            entry["at_crossfit"] = fold_metric.at_threshold(own)
        timing = training_time(run.read_history(fold) or [])
        if timing:
            entry["training"] = timing
        recorded = run.read_fold_metrics(fold) or {}
        if recorded.get("auc_exact") is not None:
            entry["auc_exact"] = recorded["auc_exact"]
        explain = recorded.get("explainability")
        if explain:
            entry["explainability"] = explain["mean_std"]
        per_fold.append(entry)
    splits = run.read_splits()
    summary: dict[str, Any] = {
        "polypseg_version": __version__,
        "run": run.name,
        "recipe": settings.config.train.recipe,
        "data": settings.data,
        "n_images": len(stems),
        "folds": len(per_fold),
        "folds_planned": int(splits["k"]) if splits is not None else len(per_fold),
        "threshold": chosen,
        "threshold_selection": THRESHOLD_SELECTION,
        "per_fold": per_fold,
        "mean_std": {
            key: {name: mean_std([f[key][name] for f in per_fold]) for name in METRIC_NAMES}
            for key in ("at_0.5", "at_chosen", "at_crossfit")
            if all(key in f for f in per_fold)
        },
        "pooled": {
            "at": {f"{t:g}": pooled.at_threshold(t) for t in pooled.thresholds},
            "auc": pooled.auc(),
        },
        "paper": PAPER_RESULTS,
    }
    if per_fold and all("auc_exact" in f for f in per_fold):  # folds recorded before it have none
        summary["auc_exact"] = mean_std([f["auc_exact"] for f in per_fold])
    explain_folds = [f["explainability"] for f in per_fold if "explainability" in f]
    if explain_folds:
        summary["explainability"] = _mean_over_folds(explain_folds)
    if elapsed_s is not None:
        previous = (run.read_summary() or {}).get("wall_time_s")
        summary["wall_time_s"] = round(elapsed_s, 1) if previous is None else previous
        summary["last_invocation_s"] = round(elapsed_s, 1)
    if wall_time_s is not None:
        summary["wall_time_s"] = round(wall_time_s, 1)
    if paused_s:
        summary["paused_s"] = round(paused_s, 1)
    return summary, pooled


def cross_fitted_thresholds(
    pooled: SegmentationMetrics, fold_ids: np.ndarray, candidates: Sequence[float]
) -> dict[int, float]:
    """Each fold's threshold chosen on the other folds' out-of-fold predictions only.

    The pooled choice uses every image, including the fold's own, so the fold's metrics at it are
    slightly optimistic; at its cross-fitted threshold no image helps choose the threshold it is
    scored at. Best mean Dice, ties to the candidate closest to 0.5, as
    :meth:`~polypseg.metrics.segmentation.SegmentationMetrics.best_threshold`. Empty with fewer than two folds.
    """
    folds = sorted({int(f) for f in fold_ids})
    if len(folds) < 2:
        return {}
    return {fold: pooled.best_threshold(candidates, images=fold_ids != fold) for fold in folds}


def training_time(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Epochs, summed and median epoch seconds, and paused seconds of a training history.

    Histories written before pauses were recorded count them as running time: the median is
    the figure that such a pause cannot move.
    """
    seconds = [float(r["seconds"]) for r in history if "seconds" in r]
    if not seconds:
        return None
    return {
        "epochs": len(seconds),
        "seconds": round(sum(seconds), 1),
        "median_epoch_s": round(float(np.median(seconds)), 1),
        "paused_s": round(sum(float(r.get("paused_seconds", 0.0)) for r in history), 1),
    }


def pooled_metrics(run_dir: RunDir | Path | str) -> SegmentationMetrics:
    """Re-evaluate a run's pooled out-of-fold predictions (for reports and studies)."""
    stems, probs, masks, _ = RunDir(run_dir).load_oof()
    return evaluate_probabilities(probs, masks, stems)


def _mean_over_folds(folds: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Mean +- std across folds of each explanation metric's per-fold mean."""
    names = sorted({name for fold in folds for name in fold})
    result = {}
    for name in names:
        values = [fold[name]["mean"] for fold in folds if name in fold and fold[name].get("n", 1)]
        result[name] = mean_std([v for v in values if v is not None and not np.isnan(v)])
    return result


def _fmt(value: Any, std: Any = None) -> str:
    """``mean ± std``; the mean alone where the spread is undefined (one fold) or not given."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    text = f"{value:.4f}"
    return text if std is None or (isinstance(std, float) and np.isnan(std)) else f"{text} ± {std:.4f}"


def _folds_text(summary: dict[str, Any]) -> str:
    done, planned = summary["folds"], summary.get("folds_planned", summary["folds"])
    if done == planned:
        return f"{done} folds"
    return f"{done} of {planned} folds finished (a partial run: its numbers cover those folds only)"


def summary_markdown(summary: dict[str, Any]) -> str:
    """A human-readable table of a summary, with the paper's numbers beside ours."""
    t = summary["threshold"]
    lines = [
        f"# Cross-validation summary: {summary['run']}",
        "",
        f"Recipe `{summary['recipe']}`, {summary['n_images']} images, {_folds_text(summary)}, data `{summary['data']}`.",
        f"Threshold chosen on pooled out-of-fold predictions: **{t:g}** ({summary['threshold_selection']}).",
        "Dice and IoU are per-image means (empty-vs-empty = 1); sensitivity and precision are pixel-level, pooled",
        "within each fold; AUC-ROC is pixel-level. Mean ± std (ddof=1) over folds.",
        "",
        "| | Dice | IoU | AUC-ROC | Sensitivity | Precision |",
        "|---|---|---|---|---|---|",
    ]
    rows = [("at_0.5", "ours @ 0.5"), ("at_chosen", f"ours @ {t:g} (chosen on these same predictions)")]
    rows.append(("at_crossfit", "ours @ each fold's threshold chosen on the other folds (cross-fitted)"))
    for key, label in rows:
        if key in summary["mean_std"]:
            ms = summary["mean_std"][key]
            lines.append(f"| {label} | " + " | ".join(_fmt(*ms[m]) for m in METRIC_NAMES) + " |")
    paper = summary.get("paper", PAPER_RESULTS)
    lines.append(
        f"| paper @ {paper['threshold']} (ImageNet encoder) | "
        + " | ".join(_fmt(*paper[m]) if paper[m][1] is not None else _fmt(paper[m][0]) for m in METRIC_NAMES)
        + " |"
    )
    if summary.get("auc_exact"):
        lines += [
            "",
            f"AUC-ROC above: from the stored uint8 probabilities in 1000 bins, whose ties bias it low. Exact, from each "
            f"fold's float probabilities before storage: **{_fmt(*summary['auc_exact'])}**.",
        ]
    lines += [
        "",
        "## Per fold",
        "",
        "| fold | n | Dice @0.5 | IoU @0.5 | AUC | Dice @t | IoU @t | Sens @t | Prec @t |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in summary["per_fold"]:
        a, c = f["at_0.5"], f["at_chosen"]
        lines.append(
            f"| {f['fold']} | {f['n_test']} | {_fmt(a['dice'])} | {_fmt(a['iou'])} | {_fmt(a['auc'])} | "
            f"{_fmt(c['dice'])} | {_fmt(c['iou'])} | {_fmt(c['sensitivity'])} | {_fmt(c['precision'])} |"
        )
    lines += [
        "",
        "## Threshold sweep (pooled out-of-fold)",
        "",
        "| threshold | Dice | IoU | Sensitivity | Precision |",
        "|---|---|---|---|---|",
    ]
    for key, m in summary["pooled"]["at"].items():
        lines.append(
            f"| {key} | {_fmt(m['dice'])} | {_fmt(m['iou'])} | {_fmt(m['sensitivity'])} | {_fmt(m['precision'])} |"
        )
    if "explainability" in summary:
        lines += [
            "",
            "## Grad-CAM checks (out-of-fold images, mean ± std over folds)",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        for name, (mean, std) in summary["explainability"].items():
            lines.append(f"| {name} | {_fmt(mean, std)} |")
    timed = [f for f in summary["per_fold"] if "training" in f]
    if timed:
        lines += [
            "",
            "## Training time per fold",
            "",
            "Seconds the process ran; stretches when it was stopped (`kill -STOP`) are counted apart. Histories",
            "written before pauses were recorded include them in the total: the median epoch is unaffected.",
            "",
            "| fold | epochs | median epoch (s) | total (min) | paused (min) |",
            "|---|---|---|---|---|",
        ]
        for f in timed:
            t = f["training"]
            lines.append(
                f"| {f['fold']} | {t['epochs']} | {t['median_epoch_s']:.1f} | {t['seconds'] / 60:.1f} | {t['paused_s'] / 60:.1f} |"
            )
    if "wall_time_s" in summary:
        paused = f" (not counting {summary['paused_s']:.1f} s stopped)" if summary.get("paused_s") else ""
        lines += ["", f"Wall time of the run: {summary['wall_time_s']:.1f} s{paused}."]
    return "\n".join(lines) + "\n"
