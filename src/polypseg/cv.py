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

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polypseg import __version__
from polypseg.checkpoint import load_checkpoint
from polypseg.config import RunConfig, config_differences
from polypseg.data import CachedData, DataError, build_cache, dataset_fingerprint
from polypseg.devices import resolve_device
from polypseg.errors import PolypsegError
from polypseg.evaluation import (
    dequantize_probabilities,
    evaluate_probabilities,
    predict_probabilities,
    quantize_probabilities,
)
from polypseg.io_utils import atomic_write, atomic_write_json, atomic_write_text, read_json, remove_stale_temps
from polypseg.metrics import DEFAULT_THRESHOLDS, METRIC_NAMES, SegmentationMetrics, mean_std
from polypseg.training import DistributedContext, resolve_run_precision, tidy_run_folder, train_model, training_finished

# PolypSeg-GradCAM (arXiv 2509.18159), Kvasir-SEG 5-fold CV, ImageNet-pretrained encoder.
PAPER_RESULTS = {
    "dice": (0.8902, 0.0115),
    "iou": (0.8023, 0.0147),
    "auc": (0.9722, 0.0031),
    "sensitivity": (0.9058, None),
    "precision": (0.9083, None),
    "threshold": 0.55,
}


class RunError(PolypsegError):
    """A run folder does not match the requested data or configuration."""


def make_splits(
    stems: Sequence[str],
    folds: int,
    seed: int = 0,
    val_fraction: float = 0.0,
) -> dict[str, Any]:
    """Seeded K-fold split of ``stems``; each fold lists ``train``, inner ``val`` and ``test`` stems."""
    if folds < 2:
        raise ValueError("--folds must be at least 2")
    if len(stems) < folds:
        raise DataError(f"{len(stems)} pairs cannot be split into {folds} folds")
    stems = sorted(stems)
    rng = np.random.default_rng(seed)
    order = [stems[i] for i in rng.permutation(len(stems))]
    return splits_from_test_folds(stems, [sorted(order[i::folds]) for i in range(folds)], seed, val_fraction)


def splits_from_test_folds(
    stems: Sequence[str], tests: Sequence[Sequence[str]], seed: int, val_fraction: float
) -> dict[str, Any]:
    """Complete given test folds with each fold's training part and a seeded inner validation split."""
    stems = sorted(stems)
    result = []
    for fold, test in enumerate(tests):
        test_set = set(test)
        rest = [s for s in stems if s not in test_set]
        n_val = int(round(val_fraction * len(rest)))
        fold_rng = np.random.default_rng([seed, fold])
        val = sorted(rest[i] for i in fold_rng.choice(len(rest), size=n_val, replace=False)) if n_val else []
        val_set = set(val)
        result.append({"fold": fold, "train": [s for s in rest if s not in val_set], "val": val, "test": sorted(test)})
    return {"seed": seed, "k": len(tests), "val_fraction": val_fraction, "stems": stems, "folds": result}


def load_or_create_splits(run_dir: Path, stems: Sequence[str], folds: int, seed: int, val_fraction: float) -> dict[str, Any]:
    """Reuse ``RUN/splits.json`` if present (checking it fits the data), else create and save it.

    A ``splits.json`` copied from another run keeps its test folds; if that run used another
    inner-validation share, each fold's train/val division is redrawn from the same test folds.
    """
    path = run_dir / "splits.json"
    if path.is_file():
        splits = read_json(path)
        if sorted(splits["stems"]) != sorted(stems):
            raise RunError(f"{path} was made for different data ({len(splits['stems'])} stems vs {len(stems)}); use a new --out")
        if splits["k"] != folds:
            raise RunError(f"{path} has {splits['k']} folds, not {folds}; use --folds {splits['k']} or a new --out")
        if splits.get("val_fraction") != val_fraction:
            tests = [f["test"] for f in sorted(splits["folds"], key=lambda f: f["fold"])]
            splits = splits_from_test_folds(stems, tests, splits.get("seed", seed), val_fraction)
            atomic_write_json(path, splits)
        return splits
    splits = make_splits(stems, folds, seed, val_fraction)
    atomic_write_json(path, splits)
    return splits


def _resumed_data(saved: str, given: Path | str | None) -> tuple[str, list[str]]:
    """The data a resumed run reads, and the change to refuse if ``given`` is other data.

    The same folder, or a copy with the same content elsewhere, is accepted (a run moved to another
    machine); so is the bundled sample, which the command line passes when ``--data`` is omitted.
    """
    if given is None:
        return saved, []
    given_path = Path(given).resolve()
    if str(given_path) == saved:
        return saved, []
    from polypseg.sample_data import sample_dataset_path

    if given_path == Path(sample_dataset_path()).resolve():
        return saved, []  # the command line's stand-in for an omitted --data
    if not Path(saved).exists():
        return str(given_path), []  # moved: splits.json still checks that the images are the run's
    try:
        if dataset_fingerprint(saved) == dataset_fingerprint(given_path):
            return str(given_path), []
    except DataError:
        pass
    return saved, [f"data: {saved!r} -> {str(given_path)!r}"]


class _WallClock:
    """The run's wall time summed over invocations (``RUN/invocations.json``), kept up to date
    after each epoch so that an interrupted invocation still counts up to its last epoch."""

    def __init__(self, run_dir: Path) -> None:
        self._path = run_dir / "invocations.json"
        self._started = time.monotonic()
        entries: list[dict[str, Any]] = []
        if self._path.is_file():
            try:
                entries = list(read_json(self._path).get("invocations", []))
            except (ValueError, AttributeError):
                entries = []
        elif (run_dir / "summary.json").is_file():  # a run summarised before invocations were recorded
            try:
                previous = read_json(run_dir / "summary.json").get("wall_time_s")
            except ValueError:
                previous = None
            if previous:
                entries.append({"started": None, "seconds": float(previous), "note": "earlier invocations, as summarised"})
        import datetime as _dt

        self._entries = entries + [{"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "seconds": 0.0}]
        self.tick()

    def tick(self) -> None:
        self._entries[-1]["seconds"] = round(time.monotonic() - self._started, 1)
        atomic_write_json(self._path, {"invocations": self._entries})

    def total(self) -> float:
        return float(sum(e.get("seconds") or 0.0 for e in self._entries))


def _fold_data(cache: CachedData, stems: Sequence[str]) -> CachedData | None:
    return cache.subset(stems) if stems else None


def refuse_changed_settings(run_dir: Path | str, changed: Sequence[str]) -> None:
    """Stop a resume that would continue a run under other settings (``changed``: ``field: saved -> given``)."""
    if changed:
        raise RunError(
            f"{run_dir} holds a run with other settings ({'; '.join(changed)}); "
            "resume it without recipe options, or choose a new --out"
        )


def run_cv(
    data: Path | str | None,
    out: Path | str,
    config: RunConfig | None = None,
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
) -> dict[str, Any]:
    """Run (or resume) K-fold cross-validation and return the summary written to ``RUN/summary.json``.

    ``config`` is required for a new run (``folds`` defaults to 5, ``seed`` to 0). With
    ``resume=True`` an existing run continues with its saved config, folds, seed and data; a
    ``config``, ``folds`` or ``seed`` given as well must match them (so rerunning the very command
    that started a run, plus ``--resume``, continues it), and ``resume=True`` on an empty folder
    starts the run. ``only_folds`` restricts this invocation to some folds (e.g. recipe selection
    on fold 0); the summary then covers the folds finished so far.
    """
    run_dir = Path(out)
    context = DistributedContext.from_env()
    config_path = run_dir / "config.json"
    if config_path.is_file():
        if not resume:
            raise RunError(f"{run_dir} already holds a run; pass --resume to continue it, or choose a new --out")
        saved = read_json(config_path)
        saved_config = RunConfig.from_dict(saved["run"])
        if config is not None:
            resolve_run_precision(config, device)
        changed = config_differences(saved_config, config) if config is not None else []
        changed += [f"{name}: {old!r} -> {new!r}" for name, old, new in (("folds", saved["folds"], folds), ("seed", saved["seed"], seed)) if new is not None and new != old]
        data, data_change = _resumed_data(saved["data"], data)
        refuse_changed_settings(run_dir, changed + data_change)
        config, folds, seed = saved_config, saved["folds"], saved["seed"]
    elif config is None:
        raise RunError(f"{run_dir} holds no run to resume; give a --recipe to start one")
    if data is None:
        raise RunError(f"{run_dir} holds no run to resume; give the --data to start one")
    folds = 5 if folds is None else folds
    seed = 0 if seed is None else seed
    assert config is not None
    resolve_run_precision(config, device)
    cache = build_cache(data, config.train.image_size, cache_dir=cache_dir, progress=progress and context.is_main)

    started = time.monotonic()
    clock = None
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            remove_stale_temps(run_dir)
        clock = _WallClock(run_dir)
        if not config_path.is_file():
            atomic_write_json(
                config_path,
                {"run": config.to_dict(), "data": str(Path(data).resolve()), "folds": folds, "seed": seed, "polypseg_version": __version__},
            )
        load_or_create_splits(run_dir, cache.stems, folds, seed, config.train.val_fraction)
    context.barrier()
    splits = read_json(run_dir / "splits.json")

    for fold in splits["folds"]:
        index = fold["fold"]
        if only_folds is not None and index not in only_folds:
            continue
        fold_dir = run_dir / f"fold_{index}"
        if resume and context.is_main:
            tidy_run_folder(fold_dir, config.train.epochs)  # stale temps; the state of a finished fold
        if (fold_dir / "metrics.json").is_file():
            continue  # finished folds are never touched again
        if not training_finished(fold_dir, config.train.epochs):
            train_model(
                config,
                cache.subset(fold["train"]),
                _fold_data(cache, fold["val"]),
                fold_dir,
                device=device,
                resume=resume,
                progress=progress,
                description=f"fold {index} (of 0-{len(splits['folds']) - 1})",  # numbered as the fold_N folders
                on_epoch=(lambda record: clock.tick()) if clock is not None else None,
            )
        if context.is_main:
            evaluate_fold(fold_dir, cache.subset(fold["test"]), config, device, explain, explain_max_images, progress)
            if clock is not None:
                clock.tick()
        context.barrier()

    summary: dict[str, Any] = {}
    if context.is_main:
        assert clock is not None
        clock.tick()
        summary = summarize_run(run_dir, elapsed_s=time.monotonic() - started, wall_time_s=clock.total())
        if report:
            _write_report(run_dir)
    context.barrier()
    return summary


def evaluate_fold(
    fold_dir: Path,
    test: CachedData,
    config: RunConfig,
    device: str = "auto",
    explain: bool = True,
    explain_max_images: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Predict the held-out fold once with the fold's best checkpoint; write ``oof.npz`` and ``metrics.json``."""
    torch_device = resolve_device(device)
    checkpoint = load_checkpoint(fold_dir / "best", device=torch_device)
    probs = predict_probabilities(
        checkpoint.model,
        test.images,
        device=torch_device,
        batch_size=config.train.eval_batch_size,
        tta_flip=config.train.tta_flip,
        precision=config.train.precision,
    )
    quantized = quantize_probabilities(probs)
    payload = {"stems": np.array(test.stems), "probs": quantized, "masks": test.masks}
    atomic_write(fold_dir / "oof.npz", lambda tmp: _save_npz(tmp, payload))
    metric = evaluate_probabilities(dequantize_probabilities(quantized), test.masks, test.stems)
    result: dict[str, Any] = {"n_test": len(test.stems), **metric.compute()}
    result["per_image"] = {"stems": test.stems, "dice_at_0.5": metric.per_image(0.5)["dice"].round(6).tolist()}
    if explain:
        result["explainability"] = _explain_fold(checkpoint.model, test, torch_device, explain_max_images)
    atomic_write_json(fold_dir / "metrics.json", result)
    return result


def _save_npz(tmp: Path, payload: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **payload)


def _explain_fold(model: torch.nn.Module, test: CachedData, device: torch.device, max_images: int | None) -> dict[str, Any]:
    from polypseg.explain_metrics import evaluate_explanations

    subset = test if max_images is None else test.subset(test.stems[:max_images])
    return evaluate_explanations(
        model,
        subset.images,
        subset.masks,
        threshold=0.5,
        device=device,
        deletion_steps=20 if device.type == "cuda" else 8,
        stems=subset.stems,
    )


def load_oof(run_dir: Path | str) -> tuple[list[str], torch.Tensor, torch.Tensor, list[int]]:
    """Pooled out-of-fold ``(stems, probabilities (N,S,S), masks (N,S,S), fold of each image)``."""
    stems: list[str] = []
    probs, masks, fold_ids = [], [], []
    for path in sorted(Path(run_dir).glob("fold_*/oof.npz"), key=lambda p: int(p.parent.name.split("_")[1])):
        with np.load(path, allow_pickle=False) as data:
            stems.extend(str(s) for s in data["stems"])
            probs.append(dequantize_probabilities(data["probs"]))
            masks.append(torch.from_numpy(data["masks"]))
            fold_ids.extend([int(path.parent.name.split("_")[1])] * len(data["stems"]))
    if not probs:
        raise RunError(f"{run_dir} has no out-of-fold predictions (fold_*/oof.npz)")
    return stems, torch.cat(probs), torch.cat(masks), fold_ids


def summarize_run(run_dir: Path | str, elapsed_s: float | None = None, wall_time_s: float | None = None) -> dict[str, Any]:
    """Pool the out-of-fold predictions, choose the threshold on them, write ``summary.{json,md}``.

    ``elapsed_s``: this invocation's time; ``wall_time_s``: the run's, summed over invocations.
    """
    run_dir = Path(run_dir)
    stems, probs, masks, fold_ids = load_oof(run_dir)
    pooled = evaluate_probabilities(probs, masks, stems)
    chosen = pooled.best_threshold(DEFAULT_THRESHOLDS)
    fold_ids_array = np.array(fold_ids)
    per_fold = []
    for fold in sorted(set(fold_ids)):
        rows = torch.from_numpy(np.flatnonzero(fold_ids_array == fold))
        fold_metric = evaluate_probabilities(probs[rows], masks[rows], thresholds=(0.5, chosen))
        entry: dict[str, Any] = {
            "fold": fold,
            "n_test": int(rows.numel()),
            "at_0.5": fold_metric.at_threshold(0.5),
            "at_chosen": fold_metric.at_threshold(chosen),
        }
        metrics_file = run_dir / f"fold_{fold}" / "metrics.json"
        if metrics_file.is_file():
            explain = read_json(metrics_file).get("explainability")
            if explain:
                entry["explainability"] = explain["mean_std"]
        per_fold.append(entry)
    config = read_json(run_dir / "config.json")
    splits_file = run_dir / "splits.json"
    pos, neg = pooled.histograms
    summary: dict[str, Any] = {
        "polypseg_version": __version__,
        "run": run_dir.name,
        "recipe": config["run"]["train"]["recipe"],
        "data": config["data"],
        "n_images": len(stems),
        "folds": len(per_fold),
        "folds_planned": int(read_json(splits_file)["k"]) if splits_file.is_file() else len(per_fold),
        "threshold": chosen,
        "threshold_selection": "best mean Dice on pooled out-of-fold predictions, 0.30..0.70 step 0.05",
        "per_fold": per_fold,
        "mean_std": {
            key: {name: mean_std([f[key][name] for f in per_fold]) for name in METRIC_NAMES}
            for key in ("at_0.5", "at_chosen")
        },
        "pooled": {
            "at": {f"{t:g}": pooled.at_threshold(t) for t in pooled.thresholds},
            "auc": pooled.auc(),
        },
        "paper": PAPER_RESULTS,
    }
    explain_folds = [f["explainability"] for f in per_fold if "explainability" in f]
    if explain_folds:
        summary["explainability"] = _mean_over_folds(explain_folds)
    if elapsed_s is not None:
        previous = read_json(run_dir / "summary.json").get("wall_time_s") if (run_dir / "summary.json").is_file() else None
        summary["wall_time_s"] = round(elapsed_s, 1) if previous is None else previous
        summary["last_invocation_s"] = round(elapsed_s, 1)
    if wall_time_s is not None:
        summary["wall_time_s"] = round(wall_time_s, 1)
    atomic_write(run_dir / "pooled_histograms.npz", lambda tmp: _save_npz(tmp, {"positive": pos, "negative": neg}))
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "summary.md", summary_markdown(summary))
    return summary


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
    for key, label in (("at_0.5", "ours @ 0.5"), ("at_chosen", f"ours @ {t:g}")):
        ms = summary["mean_std"][key]
        lines.append(f"| {label} | " + " | ".join(_fmt(*ms[m]) for m in METRIC_NAMES) + " |")
    paper = summary.get("paper", PAPER_RESULTS)
    lines.append(
        f"| paper @ {paper['threshold']} (ImageNet encoder) | "
        + " | ".join(_fmt(*paper[m]) if paper[m][1] is not None else _fmt(paper[m][0]) for m in METRIC_NAMES)
        + " |"
    )
    lines += ["", "## Per fold", "", "| fold | n | Dice @0.5 | IoU @0.5 | AUC | Dice @t | IoU @t | Sens @t | Prec @t |", "|---|---|---|---|---|---|---|---|---|"]
    for f in summary["per_fold"]:
        a, c = f["at_0.5"], f["at_chosen"]
        lines.append(
            f"| {f['fold']} | {f['n_test']} | {_fmt(a['dice'])} | {_fmt(a['iou'])} | {_fmt(a['auc'])} | "
            f"{_fmt(c['dice'])} | {_fmt(c['iou'])} | {_fmt(c['sensitivity'])} | {_fmt(c['precision'])} |"
        )
    lines += ["", "## Threshold sweep (pooled out-of-fold)", "", "| threshold | Dice | IoU | Sensitivity | Precision |", "|---|---|---|---|---|"]
    for key, m in summary["pooled"]["at"].items():
        lines.append(f"| {key} | {_fmt(m['dice'])} | {_fmt(m['iou'])} | {_fmt(m['sensitivity'])} | {_fmt(m['precision'])} |")
    if "explainability" in summary:
        lines += ["", "## Grad-CAM checks (out-of-fold images, mean ± std over folds)", "", "| metric | value |", "|---|---|"]
        for name, (mean, std) in summary["explainability"].items():
            lines.append(f"| {name} | {_fmt(mean, std)} |")
    if "wall_time_s" in summary:
        lines += ["", f"Wall time of the run: {summary['wall_time_s']:.1f} s."]
    return "\n".join(lines) + "\n"


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


def pooled_metrics(run_dir: Path | str) -> SegmentationMetrics:
    """Re-evaluate a finished run's pooled out-of-fold predictions (for reports and studies)."""
    stems, probs, masks, _ = load_oof(run_dir)
    return evaluate_probabilities(probs, masks, stems)
