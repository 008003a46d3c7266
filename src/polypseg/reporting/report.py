"""``RUN/report.html``: everything about one cross-validation run on one self-contained page."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polypseg._version import __version__
from polypseg.core.devices import resolve_device
from polypseg.core.io_utils import atomic_write_text, read_json
from polypseg.core.runs import CV, OutOfFold, RunDir, RunError, RunSettings
from polypseg.errors import PolypsegError
from polypseg.explain.gallery import select_cases
from polypseg.metrics.boundary import boundary_f1, default_tolerance
from polypseg.metrics.segmentation import (
    METRIC_NAMES,
    dice_score,
    iou_score,
    mean_std,
    precision_recall_from_histograms,
)
from polypseg.reporting import figures
from polypseg.reporting.cases import Case, add_heatmaps, load_case_images

EXPLAIN_LABELS = {
    "dice": ("Dice of the explained prediction", "higher is better"),
    "energy_inside": ("Energy inside ground truth", "share of heatmap mass inside the polyp; higher is better"),
    "pointing_game": ("Pointing game", "heatmap maximum inside the polyp; higher is better"),
    "topk_iou": ("Top-15% IoU", "IoU of the most salient 15% of pixels with the polyp; higher is better"),
    "deletion_auc": ("Deletion AUC", "score left as salient pixels are removed; lower is better"),
    "insertion_auc": ("Insertion AUC", "score as salient pixels are revealed; higher is better"),
}
BOX_LABELS = {"dice": "Dice", "iou": "IoU", "boundary_f1": "Boundary F1"}


class ReportError(PolypsegError):
    """A folder that holds no run (or no finished fold) to report on."""


def write_report(
    run_dir: Path | str,
    out_html: Path | str | None = None,
    device: str = "cpu",
    n_cases: int = 4,
    n_worst: int = 6,
) -> Path:
    """Write ``RUN/report.html`` (self-contained: figures embedded, no external resources) and ``RUN/figures/*.png``.

    Works on a partially finished run (the finished folds are shown). Reads the run through
    :class:`~polypseg.core.runs.RunDir` and writes nothing but the report and its figures: a run whose
    ``summary.json`` is missing or behind its folds is summarised in memory. Returns the HTML path.
    """
    from polypseg.reporting.html import render_report

    run = RunDir(run_dir)
    settings, done = _reportable_run(run)
    summary, histograms = _current_summary(run, done)
    threshold = float(summary["threshold"])
    tolerance = default_tolerance(settings.config.train.image_size)
    scored = _score_out_of_fold(run.load_oof(), summary, threshold, tolerance)
    figure_set = _FigureSet(run.figures_dir)
    auc, average_precision = _add_run_figures(figure_set, run, summary, histograms, scored, tolerance)
    cases, notes = _load_cases(run, settings, scored, threshold, n_cases=n_cases, n_worst=n_worst, device=device)
    _add_case_figures(figure_set, cases, threshold)

    context = {
        "title": f"polypseg report: {run.name}",
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "settings": _settings(run, settings, summary, done),
        "partial": len(done) < (settings.folds or len(done)),
        "threshold": threshold,
        "summary_rows": _summary_rows(summary, threshold, scored.bf1_fold),
        "fold_rows": _fold_rows(summary, scored.bf1_fold),
        "sweep_rows": _sweep_rows(summary["pooled"]["at"], threshold),
        "pooled": {"auc": _num(auc), "ap": _num(average_precision)},
        "auc_exact": _pm(summary["auc_exact"]) if summary.get("auc_exact") else None,
        "figures": figure_set.by_id,
        "explain": _explain_section(run, scored.folds),
        "case_rows": cases.rows(),
        "external": _external_rows(run),
        "tolerance": tolerance,
        "notes": notes,
    }
    html = render_report(context)
    out = Path(out_html) if out_html is not None else run.report_path
    atomic_write_text(out, html)
    return out


def _reportable_run(run: RunDir) -> tuple[RunSettings, list[int]]:
    """The run's settings and finished folds; a one-line :class:`ReportError` for a folder the report cannot cover."""
    if not run.has_settings():
        raise ReportError(f"{run.path} is not a polypseg run folder (no config.json)")
    try:
        settings = run.read_settings()
    except RunError as error:
        raise ReportError(str(error)) from None
    if settings.kind != CV:
        raise ReportError(f"{run.path} is a single-split training folder, not a CV run folder")
    done = run.finished_folds()
    if not done:
        if any(run.fold_metrics_path(i).is_file() for i in run.fold_indices()):
            raise ReportError(
                f"{run.path}: its folds are evaluated but their out-of-fold predictions (fold_*/oof.npz) are not "
                "here (a committed record keeps only small files); the report needs them. Its summary.md and "
                "polypseg compare work without them."
            )
        raise ReportError(f"{run.path} has no finished fold yet (fold_*/oof.npz); nothing to report")
    return settings, done


def _current_summary(run: RunDir, done: list[int]) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """The run's summary and pooled pixel histograms: as saved where they cover every finished fold,
    else computed in memory (a partial or interrupted run), never written into the run."""
    from polypseg.reporting.summary import compute_summary, pooled_metrics

    summary = run.read_summary()
    histograms = run.read_pooled_histograms()
    if summary is None or summary.get("folds") != len(done):
        computed, pooled = compute_summary(run)  # a partial or interrupted run: the folds that exist
        summary = computed.to_json()
        histograms = pooled.histograms
    elif histograms is None:
        histograms = pooled_metrics(run).histograms
    return summary, histograms


@dataclass(frozen=True)
class _ScoredOutOfFold:
    """The pooled out-of-fold predictions with their per-image scores at the chosen threshold
    (``dice``, ``iou``, ``boundary_f1``) and each fold's mean boundary F1 (``at_0.5``,
    ``at_chosen`` and, where every fold has one, ``at_crossfit``)."""

    oof: OutOfFold
    per_image: dict[str, np.ndarray]
    bf1_fold: dict[str, list[float]]

    @property
    def fold_array(self) -> np.ndarray:
        return np.asarray(self.oof.folds)

    @property
    def folds(self) -> list[int]:
        return sorted(set(self.oof.folds))


def _score_out_of_fold(oof: OutOfFold, summary: dict[str, Any], threshold: float, tolerance: int) -> _ScoredOutOfFold:
    """Score every out-of-fold image at ``threshold``, and each fold's boundary F1 at each threshold reported."""
    probs, masks = oof.probs, oof.masks
    fold_array = np.asarray(oof.folds)
    pred_t, pred_05 = probs >= threshold, probs >= 0.5
    per_image = {
        "dice": dice_score(pred_t, masks).numpy(),
        "iou": iou_score(pred_t, masks).numpy(),
        "boundary_f1": np.asarray(boundary_f1(pred_t, masks, tolerance)),
    }
    bf1_05 = np.asarray(boundary_f1(pred_05, masks, tolerance))
    folds = sorted(set(oof.folds))
    bf1_fold = {
        "at_0.5": [float(bf1_05[fold_array == f].mean()) for f in folds],
        "at_chosen": [float(per_image["boundary_f1"][fold_array == f].mean()) for f in folds],
    }
    own = {f["fold"]: f["crossfit_threshold"] for f in summary["per_fold"] if "crossfit_threshold" in f}
    if len(own) == len(folds):
        bf1_fold["at_crossfit"] = [
            float(np.mean(boundary_f1(probs[fold_array == f] >= own[f], masks[fold_array == f], tolerance)))
            for f in folds
        ]
    return _ScoredOutOfFold(oof, per_image, bf1_fold)


class _FigureSet:
    """The report's figures: each written to ``<directory>/<key>.png`` and kept for embedding, in order."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.by_id: dict[str, dict[str, Any]] = {}

    def add(self, key: str, title: str, caption: str, figure: Any) -> None:
        data = figures.save_png(figure, self.directory / f"{key}.png")
        self.by_id[key] = {"id": key, "title": title, "caption": caption, "png": data, "file": f"figures/{key}.png"}


def _add_run_figures(
    figure_set: _FigureSet,
    run: RunDir,
    summary: dict[str, Any],
    histograms: tuple[np.ndarray, np.ndarray],
    scored: _ScoredOutOfFold,
    tolerance: int,
) -> tuple[float, float]:
    """The figures of the run's numbers: training curves, threshold sweep, pixel ROC/PR and per-fold
    distributions. Returns the pooled pixel AUC and average precision."""
    threshold = float(summary["threshold"])
    histories = run.histories()
    if histories:
        figure_set.add(
            "training_curves",
            "Training and validation curves",
            "Training loss (solid) and inner-validation loss (dashed) per epoch, with the inner-validation Dice used to "
            "pick each fold's best epoch. The test fold never enters these curves.",
            figures.training_curves(histories),
        )
    figure_set.add(
        "threshold_sweep",
        "Threshold sensitivity",
        f"Pooled out-of-fold Dice, IoU, sensitivity and precision against the decision threshold (0.30-0.70). "
        f"The chosen threshold ({threshold:g}, {summary.get('threshold_selection', 'best pooled Dice')}) is marked.",
        figures.threshold_sweep(summary["pooled"]["at"], threshold),
    )
    positive, negative = histograms
    recall, precision = precision_recall_from_histograms(positive, negative)
    average_precision = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    auc = float(summary["pooled"]["auc"])
    figure_set.add(
        "roc_pr",
        "Pixel ROC and precision-recall",
        "Every out-of-fold pixel of every fold pooled; curves from 1000-bin probability histograms.",
        figures.roc_pr_curves(positive, negative, auc, average_precision),
    )
    fold_array = scored.fold_array
    figure_set.add(
        "fold_boxplots",
        "Per-fold distributions",
        f"Per-image Dice, IoU and boundary F1 (tolerance {tolerance} px) at threshold {threshold:g}; "
        "triangles mark means.",
        figures.fold_boxplots(
            {
                BOX_LABELS[name]: {f: values[fold_array == f] for f in scored.folds}
                for name, values in scored.per_image.items()
            },
            threshold,
        ),
    )
    return auc, average_precision


@dataclass(frozen=True)
class _Cases:
    """The out-of-fold images the report shows, by index: the best, median and worst ``picks`` of
    the gallery and the ``worst`` of the worst-case figure."""

    by_index: dict[int, Case]
    picks: dict[str, list[int]]
    worst: list[int]

    def rows(self) -> list[dict[str, Any]]:
        """The case table: each group's cases, the worst ones of both selections without repeats."""
        groups = (
            ("best", self.picks["best"]),
            ("median", self.picks["median"]),
            ("worst", list(dict.fromkeys(self.worst + self.picks["worst"]))),
        )
        return [
            {
                "group": label,
                "stem": self.by_index[i].stem,
                "fold": self.by_index[i].fold,
                "dice": _num(self.by_index[i].dice),
                "bf1": _num(self.by_index[i].boundary_f1),
                "energy": _num(self.by_index[i].energy_inside),
            }
            for label, group in groups
            for i in group
        ]


def _load_cases(
    run: RunDir,
    settings: RunSettings,
    scored: _ScoredOutOfFold,
    threshold: float,
    *,
    n_cases: int,
    n_worst: int,
    device: str,
) -> tuple[_Cases, list[str]]:
    """Choose the cases on per-image Dice at the chosen threshold over all out-of-fold images, load
    their images and Grad-CAM heatmaps; also the problems met (reported, never raised)."""
    stems, dice = scored.oof.stems, scored.per_image["dice"]
    picks = select_cases(dice, stems, n_cases)
    worst = select_cases(dice, stems, n_worst)["worst"]
    needed = sorted({i for group in picks.values() for i in group} | set(worst))
    by_index = {
        i: Case(
            stem=stems[i],
            fold=int(scored.oof.folds[i]),
            dice=float(dice[i]),
            boundary_f1=float(scored.per_image["boundary_f1"][i]),
            mask=scored.oof.masks[i].numpy(),
            prob=scored.oof.probs[i].numpy(),
            threshold=threshold,
        )
        for i in needed
    }
    size = settings.config.train.image_size
    images, notes = load_case_images(str(settings.data), [by_index[i].stem for i in needed], size)
    for case in by_index.values():
        case.image = images.get(case.stem)
    notes += add_heatmaps(run.path, list(by_index.values()), str(resolve_device(device)))
    return _Cases(by_index, picks, worst), notes


def _add_case_figures(figure_set: _FigureSet, cases: _Cases, threshold: float) -> None:
    """The Grad-CAM gallery (best, median, worst) and the worst-case figure."""
    figure_set.add(
        "gradcam_gallery",
        "Grad-CAM gallery",
        f"Best, median and worst out-of-fold images by Dice at {threshold:g}, each explained by the model of the fold "
        "that held it out. Heatmap: Grad-CAM on the final decoder block, target = sum of the logits inside the "
        "predicted mask (the paper's). Contours: ground truth solid green, prediction dashed magenta.",
        figures.case_gallery({label: [cases.by_index[i] for i in group] for label, group in cases.picks.items()}),
    )
    figure_set.add(
        "worst_cases",
        "Worst cases",
        f"The {len(cases.worst)} lowest-Dice out-of-fold images: image, ground truth, predicted probability (mask "
        f"contour at {threshold:g} in magenta, ground truth dashed green) and Grad-CAM overlay.",
        figures.worst_cases([cases.by_index[i] for i in cases.worst]),
    )


def _sweep_rows(pooled_at: dict[str, dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """The threshold-sweep table, the chosen threshold marked."""
    return [
        {"threshold": t, **{k: _num(v) for k, v in m.items()}, "chosen": abs(float(t) - threshold) < 1e-9}
        for t, m in sorted(pooled_at.items(), key=lambda kv: float(kv[0]))
    ]


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(pair: Any) -> str:
    if pair is None:
        return "n/a"
    mean, std = pair
    if mean is None or not math.isfinite(float(mean)):
        return "n/a"
    if std is None or not math.isfinite(float(std)):  # one fold: the spread is undefined
        return _num(mean)
    return f"{_num(mean)} ± {_num(std)}"


def _settings(run: RunDir, settings: RunSettings, summary: dict[str, Any], done: list[int]) -> list[tuple[str, str]]:
    model, train = settings.config.model, settings.config.train
    rows = [
        ("run folder", str(run.path.resolve())),
        ("data", f"{settings.data} ({summary['n_images']} out-of-fold images)"),
        ("folds", f"{len(done)} of {settings.folds or len(done)} finished (split seed {settings.seed or 0})"),
        (
            "recipe",
            f"{train.recipe}: {train.epochs} epochs, batch {train.batch_size}, {train.optimizer} lr {train.lr:g}, "
            f"{train.schedule} schedule, loss {train.loss}",
        ),
        (
            "model",
            f"{model.arch} / {model.encoder}, encoder init {model.encoder_weights}, "
            f"skip connections {'on' if model.skip_connections else 'off'}, decoder {tuple(model.decoder_channels)}",
        ),
        ("resolution", f"{train.image_size} x {train.image_size} px (metrics at this resolution)"),
        ("threshold", f"{summary['threshold']:g} ({summary.get('threshold_selection', '')})"),
    ]
    if summary.get("wall_time_s") is not None:
        paused = f" (not counting {summary['paused_s']:.0f} s stopped)" if summary.get("paused_s") else ""
        rows.append(("wall time", f"{summary['wall_time_s']:.0f} s{paused}"))
    epochs = [f["training"]["median_epoch_s"] for f in summary["per_fold"] if "training" in f]
    if epochs:
        rows.append(("median epoch", ", ".join(f"{s:.0f} s" for s in epochs) + " (per fold)"))
    return rows


def _summary_rows(summary: dict[str, Any], threshold: float, bf1_fold: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = []
    labels = [("at_0.5", "ours @ 0.5"), ("at_chosen", f"ours @ {threshold:g} (chosen on these predictions)")]
    labels.append(("at_crossfit", "ours @ each fold's threshold chosen on the other folds"))
    for key, label in labels:
        if key not in summary["mean_std"] or key not in bf1_fold:
            continue
        ms = summary["mean_std"][key]
        rows.append(
            {"label": label, **{m: _pm(ms[m]) for m in METRIC_NAMES}, "bf1": _pm(mean_std(bf1_fold[key])), "ours": True}
        )
    paper = summary.get("paper")
    if paper:
        rows.append(
            {
                "label": f"paper @ {paper['threshold']} (ImageNet encoder)",
                **{m: _pm(paper[m]) for m in METRIC_NAMES},
                "bf1": "n/a",
                "ours": False,
            }
        )
    return rows


def _fold_rows(summary: dict[str, Any], bf1_fold: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = []
    for i, f in enumerate(summary["per_fold"]):
        a, c = f["at_0.5"], f["at_chosen"]
        rows.append(
            {
                "fold": f["fold"],
                "n": f["n_test"],
                "dice05": _num(a["dice"]),
                "iou05": _num(a["iou"]),
                "bf105": _num(bf1_fold["at_0.5"][i]),
                "auc": _num(a["auc"]),
                "dice": _num(c["dice"]),
                "iou": _num(c["iou"]),
                "bf1": _num(bf1_fold["at_chosen"][i]),
                "sens": _num(c["sensitivity"]),
                "prec": _num(c["precision"]),
            }
        )
    return rows


def _metric_mean(value: Any) -> float:
    """A per-fold explanation summary value: ``{"mean", "std", "n"}`` or ``[mean, std]``.

    An undefined mean (no image with a predicted or a true mask) is stored as null: NaN here.
    """
    if isinstance(value, dict):
        value = value.get("mean")
    elif isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return float("nan") if value is None else float(value)


def _explained_images(explain: dict[str, Any]) -> int:
    """Images Grad-CAM was measured on in one fold: its per-image records (cv writes them), else the
    largest per-metric count ``n`` (metrics that are NaN for an image leave it out of their own n)."""
    if "n_images" in explain:
        return int(explain["n_images"])
    if isinstance(explain.get("per_image"), list):
        return len(explain["per_image"])
    counts = [int(v["n"]) for v in explain.get("mean_std", {}).values() if isinstance(v, dict) and "n" in v]
    return max(counts, default=0)


def _explain_section(run: RunDir, folds: list[int]) -> dict[str, Any]:
    per_fold: dict[int, dict[str, float]] = {}
    settings: dict[str, Any] = {}
    counts: dict[int, int] = {}
    for fold in folds:
        explain = (run.read_fold_metrics(fold) or {}).get("explainability")
        if not explain:
            continue
        stats = explain.get("mean_std", explain)
        per_fold[fold] = {k: _metric_mean(v) for k, v in stats.items() if k in EXPLAIN_LABELS}
        counts[fold] = _explained_images(explain)
        settings = explain.get("settings", settings)
    if not per_fold:
        return {"measured": False}
    names = [k for k in EXPLAIN_LABELS if any(k in m for m in per_fold.values())]
    rows = []
    for name in names:
        values = [
            per_fold[f][name] for f in sorted(per_fold) if name in per_fold[f] and math.isfinite(per_fold[f][name])
        ]
        label, meaning = EXPLAIN_LABELS[name]
        rows.append(
            {
                "label": label,
                "meaning": meaning,
                "folds": [_num(per_fold[f].get(name)) for f in sorted(per_fold)],
                "mean": _pm(mean_std(values)) if values else "n/a",
            }
        )
    described = "; ".join(
        f"{label} {settings[key]}{unit}"
        for key, label, unit in (
            ("method", "method", ""),
            ("layer", "layer", ""),
            ("target", "target:", ""),
            ("deletion_steps", "deletion/insertion steps", ""),
            ("resolution", "at", " px"),
        )
        if key in settings
    )
    return {
        "measured": True,
        "folds": sorted(per_fold),
        "counts": [counts[f] for f in sorted(per_fold)],
        "rows": rows,
        "settings": described,
    }


def _external_rows(run: RunDir) -> list[dict[str, Any]]:
    results = []
    for path in run.external_results():
        try:
            data = read_json(path)
            t = f"{float(data['threshold']):g}"
            ensemble = (
                next(m for m in data["models"] if m["name"] == "ensemble")
                if any(m["name"] == "ensemble" for m in data["models"])
                else data["models"][0]
            )
            folds = data.get("fold_mean_std", {}).get(t, {})
            results.append(
                {
                    "dataset": data["dataset"] + (" (flip TTA)" if data.get("tta_flip") else ""),
                    "n": data["n_images"],
                    "threshold": t,
                    "in_domain": _num(data["in_domain"]["dice"].get(t)),
                    "folds_dice": _pm(folds.get("dice")),
                    "ensemble_dice": _num(ensemble["at"][t]["dice"]),
                    "ensemble_iou": _num(ensemble["at"][t]["iou"]),
                    "drop": _num(ensemble["dice_drop"].get(t)),
                    "file": path.name,
                }
            )
        except (KeyError, ValueError, StopIteration, TypeError):
            continue  # an older or foreign file: not worth failing the report
    return results
