"""K-fold cross-validation with nnU-Net's discipline.

* The seeded split is written once to ``RUN/splits.json`` and reused (``--resume`` and any later
  study on the same run); it records the stems so it can be checked against the data.
* One folder per fold. A fold whose ``metrics.json`` exists is finished and never touched again.
* Within a fold, the test part is never used for a choice: the best epoch is picked on an inner
  validation split carved from the training part (or the last epoch is kept).
* Out-of-fold probabilities of all folds are pooled and evaluated once. The decision threshold is
  swept over 0.30..0.70 on the pooled out-of-fold predictions and reported next to 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polypseg._version import __version__, source_commit
from polypseg.core.clock import Stopwatch
from polypseg.core.config import ConfigError, RunConfig, config_differences, validate_config
from polypseg.core.devices import device_name, resolve_device
from polypseg.core.io_utils import atomic_write_json, read_json, remove_stale_temps
from polypseg.core.runs import (
    CV,
    OutOfFold,
    RunDir,
    RunError,
    RunSettings,
    dequantize_probabilities,
    quantize_probabilities,
    refuse_changed_settings,
)
from polypseg.data.cache import CachedData, build_cache, resumed_data
from polypseg.data.splits import make_splits, splits_from_test_folds
from polypseg.metrics.segmentation import roc_auc_exact
from polypseg.models.checkpoint import load_checkpoint
from polypseg.reporting.summary import PAPER_RESULTS, CVSummary, compute_summary, pooled_metrics, summary_markdown
from polypseg.training.evaluation import evaluate_probabilities
from polypseg.training.loop import (
    DistributedContext,
    predict_with_recipe,
    resolve_run_precision,
    tidy_run_folder,
    train_model,
    training_finished,
)

__all__ = [
    "PAPER_RESULTS",
    "CVSummary",
    "RunError",
    "evaluate_fold",
    "load_oof",
    "load_or_create_splits",
    "make_splits",
    "pooled_metrics",
    "refuse_changed_settings",
    "run_cv",
    "splits_from_test_folds",
    "summarize_run",
    "summary_markdown",
]


def load_or_create_splits(
    run_dir: RunDir | Path | str, stems: Sequence[str], folds: int, seed: int, val_fraction: float
) -> dict[str, Any]:
    """Reuse ``RUN/splits.json`` if present (checking it fits the data), else create and save it.

    A ``splits.json`` copied from another run keeps its test folds; if that run used another
    inner-validation share, each fold's train/val division is redrawn from the same test folds.
    """
    run = RunDir(run_dir)
    splits = run.read_splits()
    if splits is not None:
        path = run.splits_path
        if sorted(splits["stems"]) != sorted(stems):
            raise RunError(
                f"{path} was made for different data ({len(splits['stems'])} stems vs {len(stems)}); use a new --out"
            )
        if splits["k"] != folds:
            raise RunError(f"{path} has {splits['k']} folds, not {folds}; use --folds {splits['k']} or a new --out")
        if splits.get("val_fraction") != val_fraction:
            tests = [f["test"] for f in sorted(splits["folds"], key=lambda f: f["fold"])]
            splits = splits_from_test_folds(stems, tests, splits.get("seed", seed), val_fraction)
            run.write_splits(splits)
        return splits
    splits = make_splits(stems, folds, seed, val_fraction)
    run.write_splits(splits)
    return splits


class _WallClock:
    """The run's wall time summed over invocations (``RUN/invocations.json``), kept up to date
    after each epoch so that an interrupted invocation still counts up to its last epoch.

    Time the process spent stopped (``kill -STOP``) is left out and recorded as ``paused_seconds``."""

    def __init__(self, run: RunDir, machine: dict[str, str] | None = None) -> None:
        self._path = run.invocations_path
        self._watch = Stopwatch()
        entries: list[dict[str, Any]] = []
        if self._path.is_file():
            try:
                entries = list(read_json(self._path).get("invocations", []))
            except (ValueError, AttributeError):
                entries = []
        elif run.summary_path.is_file():  # a run summarised before invocations were recorded
            try:
                previous = (run.read_summary() or {}).get("wall_time_s")
            except RunError:
                previous = None
            if previous:
                entries.append(
                    {"started": None, "seconds": float(previous), "note": "earlier invocations, as summarised"}
                )
        import datetime as _dt

        self._entries = entries + [
            {
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "seconds": 0.0,
                **(machine or {}),  # a run of hours spans several invocations: each says what ran it
            }
        ]
        self.tick()

    def tick(self) -> None:
        self._entries[-1].update(self._watch.record(digits=1))
        atomic_write_json(self._path, {"invocations": self._entries})

    def total(self) -> float:
        return float(sum(e.get("seconds") or 0.0 for e in self._entries))

    def paused_total(self) -> float:
        return float(sum(e.get("paused_seconds") or 0.0 for e in self._entries))


def _fold_data(cache: CachedData, stems: Sequence[str]) -> CachedData | None:
    return cache.subset(stems) if stems else None


def run_cv(
    data: Path | str | None,
    out: Path | str,
    config: RunConfig | None = None,
    *,
    folds: int | None = None,
    seed: int | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    explain: bool = True,
    explain_max_images: int | None = None,
    cache_dir: Path | str | None = None,
    report: bool = True,
    only_folds: Sequence[int] | None = None,
) -> CVSummary | None:
    """Run (or resume) K-fold cross-validation and return the summary written to ``RUN/summary.json``
    (None in the processes of a distributed run other than the main one).

    ``config`` is required for a new run (``folds`` defaults to 5, ``seed`` to 0). With
    ``resume=True`` an existing run continues with its saved config, folds, seed and data; a
    ``config``, ``folds`` or ``seed`` given as well must match them (so rerunning the very command
    that started a run, plus ``--resume``, continues it), and ``resume=True`` on an empty folder
    starts the run. ``only_folds`` restricts this invocation to some folds (e.g. recipe selection
    on fold 0); the summary then covers the folds finished so far.
    """
    run = RunDir(out)
    context = DistributedContext.from_env()
    if seed is not None and seed < 0:
        raise ConfigError(f"seed {seed}: must be >= 0")
    if config is not None:
        validate_config(config)
        if config.train.replay_images:
            raise ConfigError("train.replay_images: replay is for polypseg train (fine-tuning); cv does not use it")
    saved = run.saved_settings()
    data, config, folds, seed = _invocation_settings(
        run, saved, data, config, folds, seed, only_folds, resume=resume, device=device
    )
    resolve_run_precision(config, device)
    cache = build_cache(data, config.train.image_size, cache_dir=cache_dir, progress=progress and context.is_main)

    invocation = Stopwatch()
    clock = None
    if context.is_main:
        clock = _prepare_run_folder(
            run, saved, cache, config, data=data, folds=folds, seed=seed, resume=resume, device=device
        )
    context.barrier()
    splits = run.read_splits()
    assert splits is not None

    summary: CVSummary | None = None
    for fold in splits["folds"]:
        index = fold["fold"]
        if only_folds is not None and index not in only_folds:
            continue
        if resume and context.is_main:
            tidy_run_folder(run.fold_dir(index), config.train.epochs)  # stale temps; the state of a finished fold
        if run.fold_metrics_path(index).is_file():
            continue  # finished folds are never touched again
        _train_fold(
            run, fold, cache, config, len(splits["folds"]), clock, device=device, resume=resume, progress=progress
        )
        if context.is_main:
            evaluate_fold(run, index, cache.subset(fold["test"]), config, device, explain, explain_max_images, progress)
            assert clock is not None
            clock.tick()
            # A partial summary after every fold: a run of hours shows its finished folds' numbers early.
            summary = _summarize_invocation(run, invocation, clock)
        context.barrier()

    if context.is_main:
        assert clock is not None
        summary = _finish_invocation(run, summary, invocation, clock, report=report)
    context.barrier()
    return summary


def _invocation_settings(
    run: RunDir,
    saved: RunSettings | None,
    data: Path | str | None,
    config: RunConfig | None,
    folds: int | None,
    seed: int | None,
    only_folds: Sequence[int] | None,
    *,
    resume: bool,
    device: str,
) -> tuple[Path | str, RunConfig, int, int]:
    """The data, config, folds and seed this invocation runs with: a saved run's own when it resumes
    (anything given as well must match them), else those given (5 folds, seed 0 by default).
    ``only_folds`` must name folds the run has."""
    if saved is not None:
        if not resume:
            raise RunError(f"{run.path} already holds a run; pass --resume to continue it, or choose a new --out")
        if saved.kind != CV:
            raise RunError(
                f"{run.path} holds a single-split training run (polypseg train), not a cross-validation run; choose a new --out"
            )
        if config is not None:
            resolve_run_precision(config, device)
        changed = config_differences(saved.config, config) if config is not None else []
        changed += [
            f"{name}: {old!r} -> {new!r}"
            for name, old, new in (("folds", saved.folds, folds), ("seed", saved.seed, seed))
            if new is not None and new != old
        ]
        data, data_change = resumed_data(str(saved.data), data)
        refuse_changed_settings(run.path, changed + data_change)
        config, folds, seed = saved.config, saved.folds, saved.seed
    elif config is None:
        raise RunError(f"{run.path} holds no run to resume; give a --recipe to start one")
    if data is None:
        raise RunError(f"{run.path} holds no run to resume; give the --data to start one")
    folds = 5 if folds is None else folds
    outside = sorted({f for f in only_folds or () if not 0 <= f < folds})
    if outside:
        raise RunError(f"--only-fold {outside[0]}: a {folds}-fold run has folds 0 to {folds - 1}")
    return data, config, folds, 0 if seed is None else seed


def _prepare_run_folder(
    run: RunDir,
    saved: RunSettings | None,
    cache: CachedData,
    config: RunConfig,
    *,
    data: Path | str,
    folds: int,
    seed: int,
    resume: bool,
    device: str,
) -> _WallClock:
    """The main process's setup of an invocation: the folder, the run's splits (created once, then
    reused), the settings of a new run and the clock of this invocation. The splits come first: a
    start that cannot split the data (more folds than pairs) leaves no settings that would bind a retry."""
    run.path.mkdir(parents=True, exist_ok=True)
    load_or_create_splits(run, cache.stems, folds, seed, config.train.val_fraction)
    if resume:
        remove_stale_temps(run.path)
    clock = _WallClock(
        run,
        {
            "machine": device_name(resolve_device(device)),
            "precision": config.train.precision,
            "polypseg_version": __version__,
            **({"commit": commit} if (commit := source_commit()) else {}),
        },
    )
    if saved is None:
        run.write_settings(
            RunSettings(
                config=config,
                kind=CV,
                data=str(Path(data).resolve()),
                folds=folds,
                seed=seed,
                polypseg_version=__version__,
            )
        )
    return clock


def _train_fold(
    run: RunDir,
    fold: dict[str, Any],
    cache: CachedData,
    config: RunConfig,
    n_folds: int,
    clock: _WallClock | None,
    *,
    device: str,
    resume: bool,
    progress: bool,
) -> None:
    """Train one fold of the splits (or continue its training) unless its training is finished."""
    index = fold["fold"]
    fold_dir = run.fold_dir(index)
    if training_finished(fold_dir, config.train.epochs):
        return
    train_model(
        config,
        cache.subset(fold["train"]),
        _fold_data(cache, fold["val"]),
        fold_dir,
        device=device,
        resume=resume,
        progress=progress,
        description=f"fold {index} (of 0-{n_folds - 1})",  # numbered as the fold_N folders
        on_epoch=(lambda record: clock.tick()) if clock is not None else None,
    )


def _finish_invocation(
    run: RunDir, summary: CVSummary | None, invocation: Stopwatch, clock: _WallClock, *, report: bool
) -> CVSummary:
    """The main process's end of an invocation: its summary (if no fold was evaluated in it, a
    summary of what is there) and, if asked, the HTML report, unless no fold was evaluated and the
    report already shows every fold's result (a resumed finished run need not redraw its figures)."""
    evaluated = summary is not None
    if summary is None:
        clock.tick()
        summary = _summarize_invocation(run, invocation, clock)
    if report and (evaluated or not _report_is_current(run)):
        _write_report(run.path)
    return summary


def _report_is_current(run: RunDir) -> bool:
    """The report exists and was written after every fold's results."""
    if not run.report_path.is_file():
        return False
    written = run.report_path.stat().st_mtime_ns
    metrics = [run.fold_metrics_path(fold) for fold in run.fold_indices()]
    return all(not path.is_file() or path.stat().st_mtime_ns <= written for path in metrics)


def _summarize_invocation(run: RunDir, invocation: Stopwatch, clock: _WallClock) -> CVSummary:
    """:func:`summarize_run` with this invocation's elapsed time and the run's wall and paused time."""
    return summarize_run(run, elapsed_s=invocation.seconds(), wall_time_s=clock.total(), paused_s=clock.paused_total())


def evaluate_fold(
    run: RunDir,
    fold: int,
    test: CachedData,
    config: RunConfig,
    device: str = "auto",
    explain: bool = True,
    explain_max_images: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Predict the held-out fold once with the fold's best checkpoint; write its ``oof.npz`` and ``metrics.json``."""
    torch_device = resolve_device(device)
    checkpoint = load_checkpoint(run.best_checkpoint(fold), device=torch_device)
    probs = predict_with_recipe(checkpoint.model, test.images, config.train, torch_device)
    quantized = quantize_probabilities(probs)
    run.write_oof(fold, test.stems, quantized, test.masks)
    metric = evaluate_probabilities(dequantize_probabilities(quantized), test.masks, test.stems)
    result: dict[str, Any] = {"n_test": len(test.stems), **metric.compute()}
    # The stored uint8 levels tie many pixels and bias the recorded AUC low (~0.01 on a paper-recipe
    # fold); the exact value from the float probabilities is kept beside it, not instead of it, so
    # runs recorded before it stay comparable.
    result["auc_exact"] = roc_auc_exact(probs, test.masks)
    result["per_image"] = {"stems": test.stems, "dice_at_0.5": metric.per_image(0.5)["dice"].round(6).tolist()}
    if explain:
        steps = _run_deletion_steps(run, torch_device)
        result["explainability"] = _explain_fold(checkpoint.model, test, torch_device, explain_max_images, steps)
    atomic_write_json(run.fold_metrics_path(fold), result)
    return result


def _run_deletion_steps(run: RunDir, device: torch.device) -> int:
    """Deletion/insertion steps for a fold's Grad-CAM checks: what the run's earlier folds used, so
    a run resumed on another device stays comparable across folds; otherwise 20 on CUDA, 8 on CPU
    (each step is a forward pass of every image)."""
    for fold in run.fold_indices():
        metrics_path = run.fold_metrics_path(fold)
        if metrics_path.is_file():
            steps = read_json(metrics_path).get("explainability", {}).get("deletion_steps")
            if steps:
                return int(steps)
    return 20 if device.type == "cuda" else 8


def _explain_fold(
    model: torch.nn.Module, test: CachedData, device: torch.device, max_images: int | None, deletion_steps: int
) -> dict[str, Any]:
    from polypseg.explain.metrics import evaluate_explanations

    subset = test if max_images is None else test.subset(test.stems[:max_images])
    return evaluate_explanations(
        model,
        subset.images,
        subset.masks,
        threshold=0.5,
        device=device,
        deletion_steps=deletion_steps,
        stems=subset.stems,
    )


def load_oof(run_dir: RunDir | Path | str) -> OutOfFold:
    """Pooled out-of-fold ``(stems, probabilities (N,S,S), masks (N,S,S), fold of each image)``."""
    return RunDir(run_dir).load_oof()


def summarize_run(
    run_dir: RunDir | Path | str,
    elapsed_s: float | None = None,
    wall_time_s: float | None = None,
    paused_s: float | None = None,
) -> CVSummary:
    """Summarise the finished folds (:func:`polypseg.reporting.summary.compute_summary`) and write
    ``summary.{json,md}`` and ``pooled_histograms.npz`` into the run; returns the summary."""
    run = RunDir(run_dir)
    summary, pooled = compute_summary(run, elapsed_s=elapsed_s, wall_time_s=wall_time_s, paused_s=paused_s)
    run.write_pooled_histograms(*pooled.histograms)
    run.write_summary(summary.to_json(), summary_markdown(summary))
    return summary


def _write_report(run_dir: Path) -> None:
    """The HTML report is a view of the finished run: a failure here must not fail the run."""
    from polypseg.reporting import write_report

    try:
        write_report(run_dir)
    except Exception as error:  # noqa: BLE001
        import logging

        logging.getLogger(__name__).warning(
            "the report could not be written (%s: %s); the run is complete, retry with: polypseg report %s",
            type(error).__name__, error, run_dir,
        )  # fmt: skip
