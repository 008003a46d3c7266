"""External validation: a CV run's fold models and their ensemble (or one checkpoint) scored on
another dataset without retraining (``polypseg evaluate``, docs/studies.md)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polypseg._version import __version__
from polypseg.core.devices import resolve_device
from polypseg.core.io_utils import atomic_write_json, atomic_write_text
from polypseg.core.runs import EXTERNAL_PREFIX, RunDir, fold_name, parse_fold_name
from polypseg.data.cache import CachedData, build_cache
from polypseg.experiments.study_common import (
    EXTERNAL_METRICS,
    StudyError,
    model_metrics,
    score_text,
    tta_suffix,
    with_tta,
)
from polypseg.metrics.boundary import default_tolerance
from polypseg.metrics.segmentation import bootstrap_ci, dice_score, iou_score, mean_std, roc_auc_exact
from polypseg.models.checkpoint import Checkpoint, find_checkpoints, load_checkpoint
from polypseg.training.loop import predict_with_recipe


def dataset_name(data: Path | str) -> str:
    """A dataset's name: its folder's name, or a cache file's name without ``-<size>[px][-<key>].npz``."""
    path = Path(data).resolve()
    if path.suffix == ".npz":
        return re.sub(r"-\d+(px)?(-[0-9a-f]{16})?$", "", path.stem)
    return path.name


def evaluate_external(
    model: Path | str,
    data: Path | str,
    out: Path | str | None = None,
    device: str = "auto",
    cache_dir: Path | str | None = None,
    progress: bool = True,
    tta_flip: bool | None = None,
) -> dict[str, Any]:
    """Evaluate a CV run (each fold model and the fold ensemble) or one checkpoint on another dataset.

    Predictions are made at the models' input resolution on ``build_cache(data, size)``, exactly as
    ``polypseg cv`` evaluates its folds, at the run's chosen threshold and at 0.5. The Dice drop is
    the run's in-domain pooled out-of-fold Dice minus the external Dice. Writes
    ``external_<dataset>.json`` and ``.md`` to ``out`` (default: the run folder) and returns the dict.
    ``tta_flip`` overrides the recipe's flip test-time augmentation; where that changes it, the
    files are ``external_<dataset>_tta.*`` (or ``_no_tta``), beside the recipe's own.
    """
    model = Path(model)
    checkpoints = find_checkpoints(model)
    run = RunDir(model) if RunDir(model).summary_path.is_file() else None
    summary = run.read_summary() if run is not None else None
    torch_device = resolve_device(device)

    first = load_checkpoint(checkpoints[0], device="cpu")
    size = first.config.train.image_size
    threshold = float(summary["threshold"]) if summary is not None else first.threshold
    thresholds = sorted({0.5, round(threshold, 4)})
    data = Path(data)
    cache = build_cache(data, size, cache_dir=cache_dir, progress=progress)
    scoring = _Scoring(cache, thresholds, default_tolerance(size), tta_flip, torch_device)
    warnings = _not_external_warnings(run, data, cache.stems) if run is not None else []
    entries, ensemble_sum = _score_models(checkpoints, first, scoring, progress, data.name)

    result: dict[str, Any] = {
        "polypseg_version": __version__,
        "model": str(model),
        "data": str(data.resolve()),
        "dataset": dataset_name(data),
        "n_images": len(cache.stems),
        "resolution": size,
        "threshold": threshold,
        "thresholds": thresholds,
        "tta_flip": with_tta(first.config.train, tta_flip).tta_flip,
        "boundary_tolerance_px": scoring.tolerance,
        "models": entries,
        "warnings": warnings,
    }
    final = ensemble_sum / len(entries)  # the ensemble, or the one model
    model_name = "ensemble" if len(entries) > 1 else entries[0]["name"]
    result["per_image"], result["ci95"] = _per_image_scores(final, cache, threshold, model_name)
    if len(entries) > 1:
        _add_ensemble(result, final, scoring)
    result["in_domain"] = _in_domain_reference(summary, thresholds)
    _add_dice_drops(entries, result["in_domain"], summary, threshold)

    out_dir = Path(out) if out is not None else (run.path if run is not None else checkpoints[0].parent)
    stem = f"{EXTERNAL_PREFIX}{result['dataset']}{tta_suffix(first.config.train, tta_flip)}"
    atomic_write_json(out_dir / f"{stem}.json", result)
    atomic_write_text(out_dir / f"{stem}.md", external_markdown(result))
    result["written"] = [str(out_dir / f"{stem}.json"), str(out_dir / f"{stem}.md")]
    return result


@dataclass(frozen=True)
class _Scoring:
    """How every model of one external evaluation predicts and is scored: the same images, thresholds,
    boundary tolerance, flip-TTA choice and device."""

    cache: CachedData
    thresholds: list[float]
    tolerance: int
    tta_flip: bool | None
    device: torch.device

    def predict(self, checkpoint: Checkpoint) -> torch.Tensor:
        """The checkpoint's probabilities for every image, as its recipe evaluates (TTA as asked)."""
        checkpoint.model.to(self.device)
        recipe = with_tta(checkpoint.config.train, self.tta_flip)
        probs = predict_with_recipe(checkpoint.model, self.cache.images, recipe, self.device)
        checkpoint.model.to("cpu")
        return probs

    def scores(self, probs: torch.Tensor) -> dict[str, Any]:
        """A model's entry scores: its metrics at each threshold and its exact pixel AUC."""
        return {
            "at": model_metrics(probs, self.cache.masks, self.thresholds, self.tolerance),
            "auc_exact": roc_auc_exact(probs, self.cache.masks),
        }


def _not_external_warnings(run: RunDir, data: Path, stems: Sequence[str]) -> list[str]:
    """Why the evaluation may not be external: the data is the run's own, or shares image names with it."""
    warnings: list[str] = []
    trained_on = run.read_settings().data
    if trained_on is not None and Path(trained_on).resolve() == data.resolve():
        warnings.append(f"{data} is the run's own training data: this is not an external validation")
    splits = run.read_splits()
    if splits is not None:
        overlap = set(splits["stems"]) & set(stems)
        if overlap:
            warnings.append(
                f"{len(overlap)} image name(s) of {data.name} also occur in the training data, e.g. '{sorted(overlap)[0]}'"
            )
    return warnings


def _score_models(
    checkpoints: list[Path], first: Checkpoint, scoring: _Scoring, progress: bool, data_name: str
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Each checkpoint's entry (name, path, scores) and the sum of their probabilities, for the ensemble.

    ``first`` is ``checkpoints[0]``, already loaded; every other checkpoint must share its resolution."""
    size = first.config.train.image_size
    entries: list[dict[str, Any]] = []
    ensemble_sum = torch.zeros((len(scoring.cache.stems), size, size), dtype=torch.float32)
    items: Any = list(enumerate(checkpoints))
    if progress:
        from rich.progress import track

        items = track(items, description=f"evaluating {len(checkpoints)} model(s) on {data_name}", transient=True)
    for i, path in items:
        checkpoint = first if i == 0 else load_checkpoint(path, device="cpu")
        if checkpoint.config.train.image_size != size:
            raise StudyError(
                f"{path} was trained at {checkpoint.config.train.image_size} px, {checkpoints[0]} at {size} px"
            )
        probs = scoring.predict(checkpoint)
        ensemble_sum += probs
        fold = parse_fold_name(path.parent.name)
        name = fold_name(fold) if fold is not None else path.stem
        entries.append({"name": name, "checkpoint": str(path), **scoring.scores(probs)})
    return entries, ensemble_sum


def _per_image_scores(
    probs: torch.Tensor, cache: CachedData, threshold: float, model_name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-image Dice and IoU of ``probs`` at ``threshold``, and the bootstrap 95% intervals of their means."""
    truth = torch.from_numpy(cache.masks)
    dice_per_image = dice_score(probs >= threshold, truth).numpy()
    iou_per_image = iou_score(probs >= threshold, truth).numpy()
    per_image = {
        "stems": cache.stems,
        "model": model_name,
        "threshold": threshold,
        "dice": dice_per_image.round(6).tolist(),
        "iou": iou_per_image.round(6).tolist(),
    }
    ci95 = {
        "method": "percentile bootstrap over the images, 10000 resamples, seed 0",
        "threshold": threshold,
        "dice": list(bootstrap_ci(dice_per_image)),
        "iou": list(bootstrap_ci(iou_per_image)),
    }
    return per_image, ci95


def _add_ensemble(result: dict[str, Any], ensemble: torch.Tensor, scoring: _Scoring) -> None:
    """Add the ensemble (mean of the fold models' probabilities) as a model, and the folds' mean ± std."""
    entries = result["models"]
    entry = {"name": "ensemble", "members": len(entries), **scoring.scores(ensemble)}
    result["per_image"][f"ensemble_dice_at_{result['threshold']:g}"] = result["per_image"]["dice"]
    result["fold_mean_std"] = {
        f"{t:g}": {m: list(mean_std([e["at"][f"{t:g}"][m] for e in entries])) for m in EXTERNAL_METRICS}
        for t in scoring.thresholds
    }
    entries.append(entry)


def _add_dice_drops(
    entries: list[dict[str, Any]], in_domain: dict[str, Any], summary: dict[str, Any] | None, threshold: float
) -> None:
    """Each entry's Dice drop from the in-domain reference and, for a fold model, its own held-out fold's Dice."""
    for entry in entries:
        entry["dice_drop"] = {
            key: (in_domain["dice"][key] - entry["at"][key]["dice"]) if in_domain["dice"].get(key) is not None else None
            for key in entry["at"]
        }
        fold = parse_fold_name(entry["name"])
        if summary is not None and fold is not None:
            own = next((f for f in summary["per_fold"] if f["fold"] == fold), None)
            if own is not None:
                entry["in_domain_own_fold_dice"] = {
                    "0.5": own["at_0.5"]["dice"],
                    f"{threshold:g}": own["at_chosen"]["dice"],
                }


def _in_domain_reference(summary: dict[str, Any] | None, thresholds: Sequence[float]) -> dict[str, Any]:
    """The run's own pooled out-of-fold Dice and IoU at each threshold, which the Dice drop is measured from."""
    if summary is None:
        return {"source": None, "dice": {f"{t:g}": None for t in thresholds}}
    pooled = summary["pooled"]["at"]
    return {
        "source": f"pooled out-of-fold predictions of the run ({summary['n_images']} images, {summary['folds']} folds)",
        "n_images": summary["n_images"],
        "dice": {f"{t:g}": pooled.get(f"{t:g}", {}).get("dice") for t in thresholds},
        "iou": {f"{t:g}": pooled.get(f"{t:g}", {}).get("iou") for t in thresholds},
    }


def external_markdown(result: dict[str, Any]) -> str:
    """The external-validation table of :func:`evaluate_external`'s result."""
    t = f"{result['threshold']:g}"
    keys = [f"{x:g}" for x in result["thresholds"]]
    n_models = sum(1 for e in result["models"] if e["name"] != "ensemble")
    lines = [
        f"# External validation on {result['dataset']}",
        "",
        f"Model `{result['model']}` ({n_models} model(s)), evaluated without retraining on `{result['data']}` "
        f"({result['n_images']} image/mask pairs) at the models' input resolution {result['resolution']}×{result['resolution']} px "
        "(images resized bilinear, masks nearest-neighbour), as `polypseg cv` evaluates its folds.",
        f"Thresholds: {t} (the run's, chosen on its pooled out-of-fold predictions) and 0.5. "
        f"Ensemble: mean of the fold models' probabilities. Boundary F1 tolerance {result['boundary_tolerance_px']} px."
        + (" Flip test-time augmentation (mean of the image and its two flips)." if result.get("tta_flip") else ""),
        "Dice drop = in-domain pooled out-of-fold Dice − external Dice (positive: worse on the new data).",
        "",
    ]
    for warning in result.get("warnings", []):
        lines += [f"**Warning:** {warning}.", ""]
    header = "| model |"
    rule = "|---|"
    for key in keys:
        header += f" Dice @{key} | IoU @{key} | BF1 @{key} |"
        rule += "---|---|---|"
    header += f" Sens @{t} | Prec @{t} | AUC | Dice drop @{t} |"
    rule += "---|---|---|---|"
    lines += [header, rule]
    rows = [e for e in result["models"] if e["name"] != "ensemble"]
    for entry in rows:
        lines.append(_external_row(entry, keys, t))
    if "fold_mean_std" in result:
        lines.append(_fold_mean_row(result, keys, t))
    for entry in result["models"]:
        if entry["name"] == "ensemble":
            lines.append(_external_row(entry, keys, t, bold=True))
    lines += ["", *_external_notes(result, keys, t)]
    return "\n".join(lines) + "\n"


def _external_row(entry: dict[str, Any], keys: list[str], t: str, bold: bool = False) -> str:
    at = entry["at"]
    cells = [score_text(at[k][m]) for k in keys for m in ("dice", "iou", "boundary_f1")]
    cells += [
        score_text(at[t]["sensitivity"]),
        score_text(at[t]["precision"]),
        score_text(at[t]["auc"]),
        score_text(entry["dice_drop"].get(t), signed=True),
    ]
    name = f"**{entry['name']}**" if bold else entry["name"]
    return f"| {name} | " + " | ".join(cells) + " |"


def _fold_mean_row(result: dict[str, Any], keys: list[str], t: str) -> str:
    """The table row of the fold models' mean ± std, with the Dice drop of their mean."""
    ms = result["fold_mean_std"]
    cells = [
        f"{score_text(ms[k][m][0])} ± {score_text(ms[k][m][1])}" for k in keys for m in ("dice", "iou", "boundary_f1")
    ]
    cells += [f"{score_text(ms[t][m][0])} ± {score_text(ms[t][m][1])}" for m in ("sensitivity", "precision", "auc")]
    drop = result["in_domain"]["dice"].get(t)
    cells.append(score_text(drop - ms[t]["dice"][0], signed=True) if drop is not None else "n/a")
    return "| folds, mean ± std | " + " | ".join(cells) + " |"


def _external_notes(result: dict[str, Any], keys: list[str], t: str) -> list[str]:
    """The lines under the table: the 95% intervals, the exact AUCs and the in-domain reference."""
    ref = result["in_domain"]
    lines: list[str] = []
    ci = result.get("ci95")
    if ci:
        lines.append(
            f"95% intervals of the {result['per_image']['model']}'s per-image means at {ci['threshold']:g} ({ci['method']}): "
            f"Dice {score_text(ci['dice'][0])}-{score_text(ci['dice'][1])}, IoU {score_text(ci['iou'][0])}-{score_text(ci['iou'][1])}."
        )
    exact = [e for e in result["models"] if e.get("auc_exact") is not None]
    if exact:  # results written before it have none
        lines.append(
            "AUC above: from 1000-bin probability histograms, which tie nearby probabilities; exact, from the "
            "sorted probabilities: " + ", ".join(f"{e['name']} {score_text(e['auc_exact'])}" for e in exact) + "."
        )
    if ref["source"]:
        lines.append(
            f"In-domain reference ({ref['source']}): "
            + ", ".join(f"Dice @{k} = {score_text(ref['dice'][k])}" for k in keys)
            + "."
        )
        own = [e for e in result["models"] if e["name"] != "ensemble" and "in_domain_own_fold_dice" in e]
        if own:
            lines.append(
                "Each fold model on its own held-out fold: "
                + ", ".join(f"{e['name']} {score_text(e['in_domain_own_fold_dice'][t])}" for e in own)
                + f" (Dice @{t})."
            )
    else:
        lines.append("No in-domain reference: the model is a single checkpoint, not a CV run folder.")
    return lines
