"""The summary of a cross-validation run, computed from its folder: a pure function of the run.

:func:`compute_summary` reads the run through :class:`~polypseg.core.runs.RunDir` and writes nothing;
:func:`polypseg.experiments.cv.summarize_run` writes its result into the run (``summary.{json,md}``), and a
report on a partial run computes it in memory. The result is a typed :class:`CVSummary`;
``CVSummary.to_json()`` is the content of ``summary.json`` and ``CVSummary.from_json`` reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


# Metric name (METRIC_NAMES) -> value at one threshold, and -> (mean, std) across folds. NaN where
# undefined (a metric of no positive pixel, the spread of one fold): null in summary.json.
Scores = dict[str, float]
Spread = dict[str, tuple[float, float]]


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _scores(record: Mapping[str, Any]) -> Scores:
    return {name: _float(value) for name, value in record.items()}


def _pair(value: Sequence[Any]) -> tuple[float, float]:
    return _float(value[0]), _float(value[1])


def _spread(record: Mapping[str, Any]) -> Spread:
    return {name: _pair(value) for name, value in record.items()}


def _optional(record: Mapping[str, Any], key: str, read: Any) -> Any:
    return read(record[key]) if key in record else None


@dataclass(frozen=True)
class TrainingTime:
    """A fold's training time (:func:`training_time`)."""

    epochs: int
    seconds: float
    median_epoch_s: float
    paused_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "seconds": self.seconds,
            "median_epoch_s": self.median_epoch_s,
            "paused_s": self.paused_s,
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TrainingTime:
        return cls(int(record["epochs"]), record["seconds"], record["median_epoch_s"], record["paused_s"])


@dataclass(frozen=True)
class FoldSummary:
    """One fold's test metrics at 0.5, at the pooled threshold and at its cross-fitted threshold."""

    fold: int
    n_test: int
    at_0_5: Scores
    at_chosen: Scores
    crossfit_threshold: float | None = None  # None with one fold: no other fold to choose it on
    at_crossfit: Scores | None = None
    training: TrainingTime | None = None
    auc_exact: float | None = None  # from the float probabilities, before storage
    explainability: dict[str, Any] | None = None  # Grad-CAM metric -> {"mean", "std", "n"}

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "fold": self.fold,
            "n_test": self.n_test,
            "at_0.5": self.at_0_5,
            "at_chosen": self.at_chosen,
        }
        if self.crossfit_threshold is not None:
            record["crossfit_threshold"] = self.crossfit_threshold
            record["at_crossfit"] = self.at_crossfit
        if self.training is not None:
            record["training"] = self.training.to_json()
        if self.auc_exact is not None:
            record["auc_exact"] = self.auc_exact
        if self.explainability is not None:
            record["explainability"] = self.explainability
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> FoldSummary:
        return cls(
            fold=int(record["fold"]),
            n_test=int(record["n_test"]),
            at_0_5=_scores(record["at_0.5"]),
            at_chosen=_scores(record["at_chosen"]),
            crossfit_threshold=record.get("crossfit_threshold"),
            at_crossfit=_optional(record, "at_crossfit", _scores),
            training=_optional(record, "training", TrainingTime.from_json),
            auc_exact=record.get("auc_exact"),
            explainability=record.get("explainability"),
        )


@dataclass(frozen=True)
class AcrossFolds:
    """Mean and std across folds of each metric, at each operating point every fold has (``mean_std``)."""

    at_0_5: Spread
    at_chosen: Spread
    at_crossfit: Spread | None = None  # None unless every fold has a cross-fitted threshold

    def to_json(self) -> dict[str, Any]:
        points = {"at_0.5": self.at_0_5, "at_chosen": self.at_chosen, "at_crossfit": self.at_crossfit}
        return {key: value for key, value in points.items() if value is not None}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> AcrossFolds:
        return cls(_spread(record["at_0.5"]), _spread(record["at_chosen"]), _optional(record, "at_crossfit", _spread))


@dataclass(frozen=True)
class PooledSummary:
    """The metrics of all out-of-fold predictions pooled: per threshold (``"0.5"`` -> scores) and the AUC."""

    at: dict[str, Scores]
    auc: float

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "auc": self.auc}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> PooledSummary:
        return cls({key: _scores(value) for key, value in record["at"].items()}, _float(record["auc"]))


@dataclass(frozen=True)
class CVSummary:
    """A cross-validation run's summary: what ``summary.json`` holds (:meth:`to_json`, :meth:`from_json`)."""

    polypseg_version: str
    run: str
    recipe: str
    data: Any  # the data the run was trained on, as its settings record it
    n_images: int
    folds: int  # folds finished
    folds_planned: int
    threshold: float  # chosen on the pooled out-of-fold predictions
    threshold_selection: str
    per_fold: tuple[FoldSummary, ...]
    mean_std: AcrossFolds
    pooled: PooledSummary
    paper: dict[str, Any]
    auc_exact: tuple[float, float] | None = None  # mean and std across folds, where every fold has it
    explainability: Spread | None = None
    wall_time_s: float | None = None  # the run's, summed over invocations, pauses left out
    last_invocation_s: float | None = None
    paused_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The content of ``summary.json`` (NaN becomes null when written)."""
        record: dict[str, Any] = {
            "polypseg_version": self.polypseg_version,
            "run": self.run,
            "recipe": self.recipe,
            "data": self.data,
            "n_images": self.n_images,
            "folds": self.folds,
            "folds_planned": self.folds_planned,
            "threshold": self.threshold,
            "threshold_selection": self.threshold_selection,
            "per_fold": [fold.to_json() for fold in self.per_fold],
            "mean_std": self.mean_std.to_json(),
            "pooled": self.pooled.to_json(),
            "paper": self.paper,
        }
        optional = {
            "auc_exact": self.auc_exact,
            "explainability": self.explainability,
            "wall_time_s": self.wall_time_s,
            "last_invocation_s": self.last_invocation_s,
            "paused_s": self.paused_s,
        }
        record.update({key: value for key, value in optional.items() if value is not None})
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> CVSummary:
        """A summary read from ``summary.json`` (those written before ``folds_planned`` plan all their folds)."""
        return cls(
            polypseg_version=record.get("polypseg_version", ""),
            run=record["run"],
            recipe=record["recipe"],
            data=record["data"],
            n_images=int(record["n_images"]),
            folds=int(record["folds"]),
            folds_planned=int(record.get("folds_planned", record["folds"])),
            threshold=float(record["threshold"]),
            threshold_selection=record.get("threshold_selection", ""),
            per_fold=tuple(FoldSummary.from_json(fold) for fold in record["per_fold"]),
            mean_std=AcrossFolds.from_json(record["mean_std"]),
            pooled=PooledSummary.from_json(record["pooled"]),
            paper=dict(record.get("paper", PAPER_RESULTS)),
            auc_exact=_optional(record, "auc_exact", _pair),
            explainability=_optional(record, "explainability", _spread),
            wall_time_s=record.get("wall_time_s"),
            last_invocation_s=record.get("last_invocation_s"),
            paused_s=record.get("paused_s"),
        )


def compute_summary(
    run_dir: RunDir | Path | str,
    elapsed_s: float | None = None,
    wall_time_s: float | None = None,
    paused_s: float | None = None,
) -> tuple[CVSummary, SegmentationMetrics]:
    """Pool the finished folds' out-of-fold predictions and choose the threshold on them.

    Returns the summary (``summary.json`` is its :meth:`CVSummary.to_json`) and the pooled metrics (whose
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
    per_fold = tuple(
        _fold_summary(run, fold, probs, masks, fold_ids_array, chosen, crossfit.get(fold))
        for fold in sorted(set(fold_ids))
    )
    splits = run.read_splits()
    explain_folds = [f.explainability for f in per_fold if f.explainability is not None]
    summary = CVSummary(
        polypseg_version=__version__,
        run=run.name,
        recipe=settings.config.train.recipe,
        data=settings.data,
        n_images=len(stems),
        folds=len(per_fold),
        folds_planned=int(splits["k"]) if splits is not None else len(per_fold),
        threshold=chosen,
        threshold_selection=THRESHOLD_SELECTION,
        per_fold=per_fold,
        mean_std=_across_folds(per_fold),
        pooled=PooledSummary({f"{t:g}": pooled.at_threshold(t) for t in pooled.thresholds}, pooled.auc()),
        paper=PAPER_RESULTS,
        auc_exact=_mean_auc_exact(per_fold),
        explainability=_mean_over_folds(explain_folds) if explain_folds else None,
        paused_s=round(paused_s, 1) if paused_s else None,
        **_wall_times(run, elapsed_s, wall_time_s),
    )
    return summary, pooled


def _fold_summary(
    run: RunDir,
    fold: int,
    probs: Any,
    masks: Any,
    fold_ids: np.ndarray,
    chosen: float,
    own: float | None,
) -> FoldSummary:
    """One fold's metrics at 0.5, at the pooled threshold and at its own cross-fitted one, with what it recorded."""
    rows = torch.from_numpy(np.flatnonzero(fold_ids == fold))
    thresholds = (0.5, chosen) if own is None else (0.5, chosen, own)
    fold_metric = evaluate_probabilities(probs[rows], masks[rows], thresholds=thresholds)
    recorded = run.read_fold_metrics(fold) or {}
    explain = recorded.get("explainability")
    return FoldSummary(
        fold=fold,
        n_test=int(rows.numel()),
        at_0_5=fold_metric.at_threshold(0.5),
        at_chosen=fold_metric.at_threshold(chosen),
        crossfit_threshold=own,
        at_crossfit=None if own is None else fold_metric.at_threshold(own),
        training=training_time(run.read_history(fold) or []),
        auc_exact=recorded.get("auc_exact"),
        explainability=explain["mean_std"] if explain else None,
    )


def _mean_auc_exact(per_fold: Sequence[FoldSummary]) -> tuple[float, float] | None:
    """Mean and std of the folds' exact AUC; None unless every fold has one (folds recorded before it
    have none, and a mean over some folds only would mislead)."""
    values = [f.auc_exact for f in per_fold if f.auc_exact is not None]
    return mean_std(values) if per_fold and len(values) == len(per_fold) else None


def _across_folds(per_fold: Sequence[FoldSummary]) -> AcrossFolds:
    """Mean and std of each metric at each operating point every fold has."""

    def spread(points: Sequence[Scores]) -> Spread:
        return {name: mean_std([p[name] for p in points]) for name in METRIC_NAMES}

    crossfit = [f.at_crossfit for f in per_fold if f.at_crossfit is not None]
    return AcrossFolds(
        at_0_5=spread([f.at_0_5 for f in per_fold]),
        at_chosen=spread([f.at_chosen for f in per_fold]),
        at_crossfit=spread(crossfit) if len(crossfit) == len(per_fold) else None,
    )


def _wall_times(run: RunDir, elapsed_s: float | None, wall_time_s: float | None) -> dict[str, float | None]:
    """``wall_time_s`` (the run's, else what an earlier summary recorded, else this invocation's) and
    ``last_invocation_s``."""
    times: dict[str, float | None] = {}
    if elapsed_s is not None:
        previous = (run.read_summary() or {}).get("wall_time_s")
        times["wall_time_s"] = round(elapsed_s, 1) if previous is None else previous
        times["last_invocation_s"] = round(elapsed_s, 1)
    if wall_time_s is not None:
        times["wall_time_s"] = round(wall_time_s, 1)
    return times


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


def training_time(history: Sequence[dict[str, Any]]) -> TrainingTime | None:
    """Epochs, summed and median epoch seconds, and paused seconds of a training history.

    Histories written before pauses were recorded count them as running time: the median is
    the figure that such a pause cannot move.
    """
    seconds = [float(r["seconds"]) for r in history if "seconds" in r]
    if not seconds:
        return None
    return TrainingTime(
        epochs=len(seconds),
        seconds=round(sum(seconds), 1),
        median_epoch_s=round(float(np.median(seconds)), 1),
        paused_s=round(sum(float(r.get("paused_seconds", 0.0)) for r in history), 1),
    )


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


def _folds_text(summary: CVSummary) -> str:
    done, planned = summary.folds, summary.folds_planned
    if done == planned:
        return f"{done} folds"
    return f"{done} of {planned} folds finished (a partial run: its numbers cover those folds only)"


def summary_markdown(summary: CVSummary) -> str:
    """A human-readable table of a summary, with the paper's numbers beside ours."""
    t = summary.threshold
    lines = [
        f"# Cross-validation summary: {summary.run}",
        "",
        f"Recipe `{summary.recipe}`, {summary.n_images} images, {_folds_text(summary)}, data `{summary.data}`.",
        f"Threshold chosen on pooled out-of-fold predictions: **{t:g}** ({summary.threshold_selection}).",
        "Dice and IoU are per-image means (empty-vs-empty = 1); sensitivity and precision are pixel-level, pooled",
        "within each fold; AUC-ROC is pixel-level. Mean ± std (ddof=1) over folds.",
        "",
        "| | Dice | IoU | AUC-ROC | Sensitivity | Precision |",
        "|---|---|---|---|---|---|",
    ]
    rows: list[tuple[Spread | None, str]] = [
        (summary.mean_std.at_0_5, "ours @ 0.5"),
        (summary.mean_std.at_chosen, f"ours @ {t:g} (chosen on these same predictions)"),
        (summary.mean_std.at_crossfit, "ours @ each fold's threshold chosen on the other folds (cross-fitted)"),
    ]
    for ms, label in rows:
        if ms is not None:
            lines.append(f"| {label} | " + " | ".join(_fmt(*ms[m]) for m in METRIC_NAMES) + " |")
    paper = summary.paper
    lines.append(
        f"| paper @ {paper['threshold']} (ImageNet encoder) | "
        + " | ".join(_fmt(*paper[m]) if paper[m][1] is not None else _fmt(paper[m][0]) for m in METRIC_NAMES)
        + " |"
    )
    if summary.auc_exact:
        lines += [
            "",
            f"AUC-ROC above: from the stored uint8 probabilities in 1000 bins, whose ties bias it low. Exact, from each "
            f"fold's float probabilities before storage: **{_fmt(*summary.auc_exact)}**.",
        ]
    return "\n".join(lines + _per_fold_lines(summary) + _timing_lines(summary)) + "\n"


def _per_fold_lines(summary: CVSummary) -> list[str]:
    """The per-fold table, the pooled threshold sweep and the Grad-CAM checks."""
    lines = [
        "",
        "## Per fold",
        "",
        "| fold | n | Dice @0.5 | IoU @0.5 | AUC | Dice @t | IoU @t | Sens @t | Prec @t |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in summary.per_fold:
        a, c = f.at_0_5, f.at_chosen
        lines.append(
            f"| {f.fold} | {f.n_test} | {_fmt(a['dice'])} | {_fmt(a['iou'])} | {_fmt(a['auc'])} | "
            f"{_fmt(c['dice'])} | {_fmt(c['iou'])} | {_fmt(c['sensitivity'])} | {_fmt(c['precision'])} |"
        )
    lines += [
        "",
        "## Threshold sweep (pooled out-of-fold)",
        "",
        "| threshold | Dice | IoU | Sensitivity | Precision |",
        "|---|---|---|---|---|",
    ]
    for key, m in summary.pooled.at.items():
        lines.append(
            f"| {key} | {_fmt(m['dice'])} | {_fmt(m['iou'])} | {_fmt(m['sensitivity'])} | {_fmt(m['precision'])} |"
        )
    if summary.explainability is not None:
        lines += [
            "",
            "## Grad-CAM checks (out-of-fold images, mean ± std over folds)",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        for name, (mean, std) in summary.explainability.items():
            lines.append(f"| {name} | {_fmt(mean, std)} |")
    return lines


def _timing_lines(summary: CVSummary) -> list[str]:
    """Training time per fold and the run's wall time."""
    lines: list[str] = []
    timed = [f for f in summary.per_fold if f.training is not None]
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
            t = f.training
            assert t is not None
            lines.append(
                f"| {f.fold} | {t.epochs} | {t.median_epoch_s:.1f} | {t.seconds / 60:.1f} | {t.paused_s / 60:.1f} |"
            )
    if summary.wall_time_s is not None:
        paused = f" (not counting {summary.paused_s:.1f} s stopped)" if summary.paused_s else ""
        lines += ["", f"Wall time of the run: {summary.wall_time_s:.1f} s{paused}."]
    return lines
