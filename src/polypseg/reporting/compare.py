"""Compare cross-validation runs fold by fold: one table, the differences, paired tests.

Every metric is recomputed from each run's out-of-fold predictions (``fold_*/oof.npz``), so all
runs are measured by the same code at the same threshold, and boundary F1 comes for free. A
paired test is only meaningful on identical folds, so the runs' ``splits.json`` must match.

A run's record without its predictions (the small files committed under ``docs/runs/``) is read
from each fold's ``metrics.json`` instead, at the thresholds its sweep recorded (0.30-0.70): the
same numbers ``polypseg cv`` computed, but no boundary F1, which needs the predictions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polypseg.core.runs import CV, RunDir, RunError, RunSettings
from polypseg.errors import PolypsegError
from polypseg.metrics.boundary import boundary_f1, default_tolerance
from polypseg.training.evaluation import evaluate_probabilities

COMPARE_METRICS = ("dice", "iou", "boundary_f1", "auc", "sensitivity", "precision")
LABELS = {
    "dice": "Dice",
    "iou": "IoU",
    "boundary_f1": "Boundary F1",
    "auc": "AUC-ROC",
    "sensitivity": "Sensitivity",
    "precision": "Precision",
}


class CompareError(PolypsegError):
    """Runs that cannot be compared (missing files, different folds)."""


@dataclass
class RunMetrics:
    """Per-fold metrics of one run at one threshold."""

    run: Path
    name: str
    threshold: float
    folds: list[int]
    values: dict[str, list[float]]
    n_test: list[int] = field(default_factory=list)
    recorded_folds: list[int] = field(default_factory=list)  # read from metrics.json: no oof.npz

    def mean_std(self, metric: str) -> tuple[float, float]:
        array = np.asarray(self.values[metric], dtype=np.float64)
        return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan  # one fold: no spread


@dataclass
class PairedTest:
    """A run against the reference run on one metric, fold by fold."""

    metric: str
    differences: list[float]
    mean: float
    std: float
    better: int
    t_p: float
    corrected_t_p: float
    wilcoxon_p: float

    def to_dict(self) -> dict[str, Any]:
        return {k: _nan_to_none(v) for k, v in self.__dict__.items()}


@dataclass
class Comparison:
    runs: list[RunMetrics]
    tests: dict[str, dict[str, PairedTest]]  # run name -> metric -> test against runs[0]
    threshold_mode: str
    tolerance: int

    @property
    def reference(self) -> RunMetrics:
        return self.runs[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold_mode,
            "boundary_tolerance_px": self.tolerance,
            "folds": self.reference.folds,
            "runs": [
                {
                    "name": r.name,
                    "path": str(r.run),
                    "threshold": r.threshold,
                    "recorded_folds": r.recorded_folds,
                    "per_fold": {m: [_nan_to_none(v) for v in r.values[m]] for m in COMPARE_METRICS},
                    "mean_std": {m: [_nan_to_none(v) for v in r.mean_std(m)] for m in COMPARE_METRICS},
                }
                for r in self.runs
            ],
            "paired_tests": {
                name: {metric: test.to_dict() for metric, test in tests.items()} for name, tests in self.tests.items()
            },
            "min_wilcoxon_p": min_wilcoxon_p(len(self.reference.folds)),
        }

    def to_markdown(self, metrics: Sequence[str] = ("dice",), title: str | None = None) -> str:
        ref = self.reference
        k = len(ref.folds)
        if self.threshold_mode == "chosen":
            how = (
                "each run's own threshold chosen on its pooled out-of-fold predictions ("
                + ", ".join(f"{r.name} {r.threshold:g}" for r in self.runs)
                + ")"
            )
        else:
            how = f"{ref.threshold:g} for every run"
        lines = [
            f"# {title or 'Comparison of ' + str(len(self.runs)) + ' runs'}",
            "",
            f"Threshold: {how}. Folds: {', '.join(map(str, ref.folds))} (identical `splits.json` test sets, checked).",
            "Dice, IoU and boundary F1 are per-image means within each fold; sensitivity, precision and AUC-ROC are",
            f"pixel-level. Mean ± std (ddof=1) over {k} folds. Boundary F1 tolerance: {self.tolerance} px at "
            f"{self._size()} px. Δ rows: mean of the per-fold differences against `{ref.name}`.",
            "",
            *self.table_lines(),
        ]
        from_records = [r.name for r in self.runs if r.recorded_folds]
        if from_records:
            lines += [
                "",
                "Read from recorded fold metrics (`metrics.json`; the out-of-fold predictions are not there): "
                + ", ".join(f"`{n}`" for n in from_records)
                + ". Boundary F1 needs the predictions, so it is n/a wherever such a run takes part.",
            ]
        for metric in metrics:
            lines += ["", *self.test_lines(metric)]
        lines += ["", *test_notes(k)]
        return "\n".join(lines) + "\n"

    def test_lines(self, metric: str, heading: str = "##") -> list[str]:
        """A markdown section with the paired tests of every run against the reference on ``metric``."""
        ref = self.reference
        k = len(ref.folds)
        lines = [
            f"{heading} Paired test across folds: {LABELS[metric]}",
            "",
            f"| run vs {ref.name} | per-fold Δ | mean Δ ± std | folds better | paired t p | corrected t p | Wilcoxon p |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in self.runs[1:]:
            t = self.tests[run.name][metric]
            per_fold = ", ".join(_signed(d) for d in t.differences)
            lines.append(
                f"| {run.name} | {per_fold} | {_signed(t.mean)} ± {_num(t.std)} | {t.better}/{k} | "
                f"{_p(t.t_p)} | {_p(t.corrected_t_p)} | {_p(t.wilcoxon_p)} |"
            )
        return lines

    def table_lines(self) -> list[str]:
        """The markdown table of mean ± std per run, with a Δ row under each run but the first."""
        ref = self.reference
        lines = [
            "| run | " + " | ".join(LABELS[m] for m in COMPARE_METRICS) + " |",
            "|---|" + "---|" * len(COMPARE_METRICS),
        ]
        for run in self.runs:
            lines.append(f"| {run.name} | " + " | ".join(_pm(*run.mean_std(m)) for m in COMPARE_METRICS) + " |")
            if run is not ref:
                tests = self.tests[run.name]
                lines.append(
                    f"| Δ {run.name} − {ref.name} | "
                    + " | ".join(_signed(tests[m].mean) for m in COMPARE_METRICS)
                    + " |"
                )
        return lines

    def _size(self) -> int:
        return _read_settings(RunDir(self.reference.run)).config.train.image_size


def min_wilcoxon_p(n: int) -> float:
    """Smallest two-sided p-value of the exact Wilcoxon signed-rank test with ``n`` pairs: 2 / 2**n."""
    return 2.0 / 2**n if n > 0 else float("nan")


def test_notes(k: int) -> list[str]:
    """What the paired tests can and cannot say with ``k`` folds."""
    if k < 2:
        return [
            f"Notes. The runs share {k} finished fold: the table compares {'it' if k == 1 else 'nothing'}, and no "
            "paired test across folds is possible (they need at least 2; the p-values above are n/a)."
        ]
    return [
        f"Notes. With {k} folds the smallest two-sided Wilcoxon signed-rank p-value is 2/2^{k} = {min_wilcoxon_p(k):.4g}"
        + (", so it can never fall below 0.05." if min_wilcoxon_p(k) > 0.05 else "."),
        "The paired t-test treats folds as independent; they are not (their training sets overlap), which makes it",
        "optimistic. The corrected t-test (Nadeau & Bengio, 2003) inflates the variance by (1/k + n_test/n_train) to",
        "account for that; prefer it, and read all three as evidence, not proof, with this few folds.",
    ]


def check_same_splits(run_dirs: Sequence[Path | str]) -> dict[str, Any]:
    """Return the first run's splits after checking every run has the same fold test sets."""
    runs = [RunDir(r) for r in run_dirs]
    reference = _read_splits(runs[0])
    ref_tests = {f["fold"]: set(f["test"]) for f in reference["folds"]}
    for run in runs[1:]:
        splits = _read_splits(run)
        tests = {f["fold"]: set(f["test"]) for f in splits["folds"]}
        if tests.keys() != ref_tests.keys():
            raise CompareError(
                f"runs {runs[0].path} and {run.path} have different folds ({len(ref_tests)} vs {len(tests)}); "
                "a paired comparison needs identical splits.json"
            )
        for fold in sorted(ref_tests):
            if tests[fold] != ref_tests[fold]:
                raise CompareError(
                    f"runs {runs[0].path} and {run.path} do not share the same splits (fold {fold} test sets differ); "
                    "a paired comparison needs identical splits.json (same data and split seed)"
                )
    return reference


def _read_splits(run: RunDir) -> dict[str, Any]:
    try:
        splits = run.read_splits()
    except RunError as error:
        raise CompareError(str(error)) from None
    if splits is None:
        raise CompareError(f"{run.path} is not a CV run folder (no splits.json)")
    return splits


def _read_settings(run: RunDir) -> RunSettings:
    """The run's typed ``config.json``; :class:`CompareError` unless it is a CV run."""
    if not run.has_settings():
        raise CompareError(f"{run.path} is not a CV run folder (no config.json)")
    try:
        settings = run.read_settings()
    except RunError as error:
        raise CompareError(str(error)) from None
    if settings.kind != CV:
        raise CompareError(f"{run.path} is a single-split training folder, not a CV run folder")
    return settings


def _resolve_threshold(run: RunDir, threshold: str | float) -> float:
    if isinstance(threshold, str) and threshold == "chosen":
        summary = run.read_summary()
        if summary is None:
            raise CompareError(
                f"{run.path} has no summary.json, so no chosen threshold; finish it with polypseg cv --resume or use --threshold 0.5"
            )
        return float(summary["threshold"])
    try:
        value = float(threshold)
    except ValueError:
        raise CompareError(f"--threshold {threshold}: use a number in (0, 1) or 'chosen'") from None
    if not 0 < value < 1:
        raise CompareError(f"--threshold {threshold}: must lie strictly between 0 and 1")
    return value


def fold_metrics(
    run_dir: Path | str,
    threshold: str | float = 0.5,
    folds: Sequence[int] | None = None,
    tolerance: int | None = None,
    name: str | None = None,
) -> RunMetrics:
    """Per-fold Dice, IoU, boundary F1, AUC, sensitivity and precision recomputed from ``oof.npz``,
    or read from the fold's ``metrics.json`` where the predictions are not there (no boundary F1)."""
    run = RunDir(run_dir)
    t = _resolve_threshold(run, threshold)
    folds = list(folds) if folds is not None else comparable_folds(run)
    if not folds:
        raise CompareError(f"{run.path} has no finished folds (fold_*/oof.npz or fold_*/metrics.json)")
    values: dict[str, list[float]] = {m: [] for m in COMPARE_METRICS}
    n_test, recorded = [], []
    for fold in folds:
        if not run.oof_path(fold).is_file() and run.fold_metrics_path(fold).is_file():
            metric, count = _recorded_metrics(run, fold, t)
            recorded.append(fold)
        else:
            try:
                _, probs, masks, _ = run.load_fold_oof(fold)
            except RunError as error:
                raise CompareError(str(error)) from None
            metric = evaluate_probabilities(probs, masks, thresholds=(t,)).at_threshold(t)
            tol = tolerance if tolerance is not None else default_tolerance(probs.shape[-1])
            metric["boundary_f1"] = float(np.mean(boundary_f1(probs >= t, masks, tol)))
            count = int(probs.shape[0])
        for m in COMPARE_METRICS:
            values[m].append(float(metric[m]))
        n_test.append(count)
    return RunMetrics(
        run=run.path,
        name=name or run.name,
        threshold=t,
        folds=folds,
        values=values,
        n_test=n_test,
        recorded_folds=recorded,
    )


def comparable_folds(run: RunDir) -> list[int]:
    """Folds with out-of-fold predictions, or at least their recorded metrics, in order."""
    return [i for i in run.fold_indices() if run.oof_path(i).is_file() or run.fold_metrics_path(i).is_file()]


def _recorded_metrics(run: RunDir, fold: int, threshold: float) -> tuple[dict[str, float], int]:
    """A fold's metrics at ``threshold`` as ``polypseg cv`` recorded them; boundary F1 is NaN."""
    try:
        recorded = run.read_fold_metrics(fold) or {}
    except RunError as error:
        raise CompareError(str(error)) from None
    at = recorded.get("at", {})
    key = next((k for k in at if math.isclose(float(k), threshold, abs_tol=1e-9)), None)
    if key is None:
        raise CompareError(
            f"{run.fold_metrics_path(fold)}: no out-of-fold predictions here, and the recorded metrics have no "
            f"threshold {threshold:g} (they have {', '.join(at) or 'none'})"
        )
    return {**{m: float(at[key][m]) for m in COMPARE_METRICS if m in at[key]}, "boundary_f1": math.nan}, int(
        recorded.get("n_test", 0)
    )


def paired_test(metric: str, reference: Sequence[float], other: Sequence[float], test_share: float) -> PairedTest:
    """Paired t-test, corrected resampled t-test and exact Wilcoxon signed-rank test of ``other - reference``."""
    from scipy import stats

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    d = b - a
    k = d.size
    mean = float(d.mean()) if k else float("nan")
    std = float(d.std(ddof=1)) if k > 1 else float("nan")
    t_p = corrected = wil = float("nan")
    if k > 1 and np.all(np.isfinite(d)):
        if np.all(d == 0):
            t_p = corrected = wil = 1.0
        elif std == 0:
            t_p = corrected = 0.0  # every fold moved by exactly the same amount
            wil = float(stats.wilcoxon(d).pvalue)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                t_p = float(stats.ttest_rel(b, a).pvalue)
                wil = float(stats.wilcoxon(d).pvalue)
            # Nadeau & Bengio (2003): Var ~ (1/k + n_test/n_train) * s^2
            ratio = test_share / max(1e-12, 1 - test_share)
            t_corr = mean / math.sqrt((1 / k + ratio) * std**2)
            corrected = float(2 * stats.t.sf(abs(t_corr), df=k - 1))
    return PairedTest(
        metric=metric,
        differences=[float(v) for v in d],
        mean=mean,
        std=std,
        better=int((d > 0).sum()),
        t_p=t_p,
        corrected_t_p=corrected,
        wilcoxon_p=wil,
    )


def _test_share(splits: dict[str, Any]) -> float:
    """n_test / (n_test + n_train) of the folds, so the corrected t-test's n_test/n_train is the real
    ratio: the inner-validation images were not trained on (1/k would overstate n_train)."""
    folds = splits.get("folds") or []
    test = sum(len(f.get("test", [])) for f in folds)
    train = sum(len(f.get("train", [])) for f in folds)
    if test and train:
        return test / (test + train)
    return 1.0 / max(2, int(splits["k"]))


def compare_runs(
    run_dirs: Sequence[Path | str],
    threshold: str | float = 0.5,
    tolerance: int | None = None,
) -> Comparison:
    """Compare runs on their common finished folds; the first run is the reference.

    Raises :class:`CompareError` if the runs' splits differ or they share no finished fold.
    """
    runs = [RunDir(r) for r in run_dirs]
    if len(runs) < 2:
        raise CompareError("give at least two run folders to compare")
    settings = [_read_settings(run) for run in runs]
    splits = check_same_splits(runs)
    common = sorted(set.intersection(*(set(comparable_folds(run)) for run in runs)))
    if not common:
        raise CompareError("the runs share no finished fold (fold_*/oof.npz or fold_*/metrics.json)")
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        names = [str(run.path) for run in runs]
    metrics = [fold_metrics(run, threshold, common, tolerance, name) for run, name in zip(runs, names, strict=False)]
    ref = metrics[0]
    test_share = _test_share(splits)
    tests = {
        run.name: {m: paired_test(m, ref.values[m], run.values[m], test_share) for m in COMPARE_METRICS}
        for run in metrics[1:]
    }
    size = settings[0].config.train.image_size
    return Comparison(
        runs=metrics,
        tests=tests,
        threshold_mode="chosen" if threshold == "chosen" else f"{float(threshold):g}",
        tolerance=tolerance if tolerance is not None else default_tolerance(size),
    )


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def _num(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _pm(mean: float, std: float) -> str:
    return "n/a" if not math.isfinite(mean) else f"{mean:.4f} ± {_num(std)}"


def _signed(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.4f}"


def _p(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"
