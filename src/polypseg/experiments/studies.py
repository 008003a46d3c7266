"""The studies PolypSeg-GradCAM proposes, each one function behind one command (docs/studies.md).

* :func:`evaluate_external`: a CV run's fold models and their ensemble on another dataset, no retraining.
* :func:`run_skip_ablation`: U-Net with vs without skip connections on identical folds.
* :func:`run_encoder_init`: ImageNet vs random encoder initialisation on identical folds.
* :func:`run_pranet`: the PraNet protocol (train on Kvasir-SEG minus 100 listed images, test once on them).

Every study is resumable: its runs are ordinary ``polypseg cv`` / ``polypseg train`` folders.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch

from polypseg._version import __version__
from polypseg.core.config import RunConfig, TrainConfig
from polypseg.core.devices import resolve_device
from polypseg.core.io_utils import atomic_write_json, atomic_write_text
from polypseg.core.runs import EXTERNAL_PREFIX, RunDir, fold_name, parse_fold_name
from polypseg.data.datasets import build_cache, index_dataset, load_split_file, read_mask
from polypseg.errors import PolypsegError
from polypseg.metrics.boundary import boundary_f1, default_tolerance
from polypseg.metrics.segmentation import bootstrap_ci, dice_score, iou_score, mean_std, roc_auc_exact
from polypseg.models.checkpoint import find_checkpoints, load_checkpoint
from polypseg.training.evaluation import evaluate_probabilities
from polypseg.training.loop import predict_with_recipe

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11; annotations only

EXTERNAL_METRICS = ("dice", "iou", "boundary_f1", "sensitivity", "precision", "auc")
# As reported by PraNet (Fan et al., MICCAI 2020, Table 1) on the same 100 Kvasir-SEG test images.
PRANET_LITERATURE = {
    "U-Net (as reported by PraNet)": {"mdice": 0.818, "miou": 0.746},
    "U-Net++ (as reported by PraNet)": {"mdice": 0.821, "miou": 0.743},
    "PraNet": {"mdice": 0.898, "miou": 0.840},
}


class StudyError(PolypsegError):
    """A study cannot start or continue (bad folders, mismatched runs)."""


def _copy_config(config: RunConfig) -> RunConfig:
    return RunConfig.from_dict(config.to_dict())


def dataset_name(data: Path | str) -> str:
    """A dataset's name: its folder's name, or a cache file's name without ``-<size>[px][-<key>].npz``."""
    path = Path(data).resolve()
    if path.suffix == ".npz":
        return re.sub(r"-\d+(px)?(-[0-9a-f]{16})?$", "", path.stem)
    return path.name


def _model_metrics(
    probs: torch.Tensor, masks: np.ndarray, thresholds: Sequence[float], tolerance: int
) -> dict[str, dict[str, float]]:
    metric = evaluate_probabilities(probs, masks, thresholds=thresholds)
    result = {}
    for t in thresholds:
        values = metric.at_threshold(t)
        values["boundary_f1"] = float(np.mean(boundary_f1(probs >= t, torch.from_numpy(masks), tolerance)))
        result[f"{t:g}"] = {m: float(values[m]) for m in EXTERNAL_METRICS}
    return result


# --------------------------------------------------------------------------------------------
# External validation


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
    tolerance = default_tolerance(size)

    warnings: list[str] = []
    if run is not None:
        trained_on = run.read_settings().data
        if trained_on is not None and Path(trained_on).resolve() == data.resolve():
            warnings.append(f"{data} is the run's own training data: this is not an external validation")
        splits = run.read_splits()
        if splits is not None:
            overlap = set(splits["stems"]) & set(cache.stems)
            if overlap:
                warnings.append(
                    f"{len(overlap)} image name(s) of {data.name} also occur in the training data, e.g. '{sorted(overlap)[0]}'"
                )

    entries: list[dict[str, Any]] = []
    ensemble_sum = torch.zeros((len(cache.stems), size, size), dtype=torch.float32)
    items: Any = list(enumerate(checkpoints))
    if progress:
        from rich.progress import track

        items = track(items, description=f"evaluating {len(checkpoints)} model(s) on {data.name}", transient=True)
    for i, path in items:
        checkpoint = first if i == 0 else load_checkpoint(path, device="cpu")
        if checkpoint.config.train.image_size != size:
            raise StudyError(
                f"{path} was trained at {checkpoint.config.train.image_size} px, {checkpoints[0]} at {size} px"
            )
        checkpoint.model.to(torch_device)
        recipe = _with_tta(checkpoint.config.train, tta_flip)
        probs = predict_with_recipe(checkpoint.model, cache.images, recipe, torch_device)
        checkpoint.model.to("cpu")
        ensemble_sum += probs
        fold = parse_fold_name(path.parent.name)
        name = fold_name(fold) if fold is not None else path.stem
        entries.append(
            {
                "name": name,
                "checkpoint": str(path),
                "at": _model_metrics(probs, cache.masks, thresholds, tolerance),
                "auc_exact": roc_auc_exact(probs, cache.masks),
            }
        )

    result: dict[str, Any] = {
        "polypseg_version": __version__,
        "model": str(model),
        "data": str(data.resolve()),
        "dataset": dataset_name(data),
        "n_images": len(cache.stems),
        "resolution": size,
        "threshold": threshold,
        "thresholds": thresholds,
        "tta_flip": _with_tta(first.config.train, tta_flip).tta_flip,
        "boundary_tolerance_px": tolerance,
        "models": entries,
        "warnings": warnings,
    }
    final = ensemble_sum / len(entries)  # the ensemble, or the one model
    truth = torch.from_numpy(cache.masks)
    dice_per_image = dice_score(final >= threshold, truth).numpy()
    iou_per_image = iou_score(final >= threshold, truth).numpy()
    result["per_image"] = {
        "stems": cache.stems,
        "model": "ensemble" if len(entries) > 1 else entries[0]["name"],
        "threshold": threshold,
        "dice": dice_per_image.round(6).tolist(),
        "iou": iou_per_image.round(6).tolist(),
    }
    result["ci95"] = {
        "method": "percentile bootstrap over the images, 10000 resamples, seed 0",
        "threshold": threshold,
        "dice": list(bootstrap_ci(dice_per_image)),
        "iou": list(bootstrap_ci(iou_per_image)),
    }
    if len(entries) > 1:
        ensemble = final
        ens = {
            "name": "ensemble",
            "members": len(entries),
            "at": _model_metrics(ensemble, cache.masks, thresholds, tolerance),
            "auc_exact": roc_auc_exact(ensemble, cache.masks),
        }
        result["per_image"][f"ensemble_dice_at_{threshold:g}"] = result["per_image"]["dice"]
        result["fold_mean_std"] = {
            f"{t:g}": {m: list(mean_std([e["at"][f"{t:g}"][m] for e in entries])) for m in EXTERNAL_METRICS}
            for t in thresholds
        }
        entries.append(ens)

    in_domain = _in_domain_reference(summary, thresholds)
    result["in_domain"] = in_domain
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

    out_dir = Path(out) if out is not None else (run.path if run is not None else checkpoints[0].parent)
    stem = f"{EXTERNAL_PREFIX}{result['dataset']}{_tta_suffix(first.config.train, tta_flip)}"
    atomic_write_json(out_dir / f"{stem}.json", result)
    atomic_write_text(out_dir / f"{stem}.md", external_markdown(result))
    result["written"] = [str(out_dir / f"{stem}.json"), str(out_dir / f"{stem}.md")]
    return result


def _with_tta(recipe: TrainConfig, tta_flip: bool | None) -> TrainConfig:
    """The recipe's evaluation settings with flip TTA as asked (``None``: the recipe's own)."""
    return recipe if tta_flip is None else dataclasses.replace(recipe, tta_flip=tta_flip)


def _tta_suffix(recipe: TrainConfig, tta_flip: bool | None) -> str:
    """How a result file's name says that TTA differs from the recipe's: ``_tta``, ``_no_tta`` or nothing."""
    if tta_flip is None or tta_flip == recipe.tta_flip:
        return ""
    return "_tta" if tta_flip else "_no_tta"


def _in_domain_reference(summary: dict[str, Any] | None, thresholds: Sequence[float]) -> dict[str, Any]:
    if summary is None:
        return {"source": None, "dice": {f"{t:g}": None for t in thresholds}}
    pooled = summary["pooled"]["at"]
    return {
        "source": f"pooled out-of-fold predictions of the run ({summary['n_images']} images, {summary['folds']} folds)",
        "n_images": summary["n_images"],
        "dice": {f"{t:g}": pooled.get(f"{t:g}", {}).get("dice") for t in thresholds},
        "iou": {f"{t:g}": pooled.get(f"{t:g}", {}).get("iou") for t in thresholds},
    }


def _f(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


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
        ms = result["fold_mean_std"]
        cells = [f"{_f(ms[k][m][0])} ± {_f(ms[k][m][1])}" for k in keys for m in ("dice", "iou", "boundary_f1")]
        cells += [f"{_f(ms[t][m][0])} ± {_f(ms[t][m][1])}" for m in ("sensitivity", "precision", "auc")]
        drop = result["in_domain"]["dice"].get(t)
        cells.append(_f(drop - ms[t]["dice"][0], signed=True) if drop is not None else "n/a")
        lines.append("| folds, mean ± std | " + " | ".join(cells) + " |")
    for entry in result["models"]:
        if entry["name"] == "ensemble":
            lines.append(_external_row(entry, keys, t, bold=True))
    ref = result["in_domain"]
    lines.append("")
    ci = result.get("ci95")
    if ci:
        lines.append(
            f"95% intervals of the {result['per_image']['model']}'s per-image means at {ci['threshold']:g} ({ci['method']}): "
            f"Dice {_f(ci['dice'][0])}-{_f(ci['dice'][1])}, IoU {_f(ci['iou'][0])}-{_f(ci['iou'][1])}."
        )
    exact = [e for e in result["models"] if e.get("auc_exact") is not None]
    if exact:  # results written before it have none
        lines.append(
            "AUC above: from 1000-bin probability histograms, which tie nearby probabilities; exact, from the "
            "sorted probabilities: " + ", ".join(f"{e['name']} {_f(e['auc_exact'])}" for e in exact) + "."
        )
    if ref["source"]:
        lines.append(
            f"In-domain reference ({ref['source']}): "
            + ", ".join(f"Dice @{k} = {_f(ref['dice'][k])}" for k in keys)
            + "."
        )
        own = [e for e in rows if "in_domain_own_fold_dice" in e]
        if own:
            lines.append(
                "Each fold model on its own held-out fold: "
                + ", ".join(f"{e['name']} {_f(e['in_domain_own_fold_dice'][t])}" for e in own)
                + f" (Dice @{t})."
            )
    else:
        lines.append("No in-domain reference: the model is a single checkpoint, not a CV run folder.")
    return "\n".join(lines) + "\n"


def _external_row(entry: dict[str, Any], keys: list[str], t: str, bold: bool = False) -> str:
    at = entry["at"]
    cells = [_f(at[k][m]) for k in keys for m in ("dice", "iou", "boundary_f1")]
    cells += [
        _f(at[t]["sensitivity"]),
        _f(at[t]["precision"]),
        _f(at[t]["auc"]),
        _f(entry["dice_drop"].get(t), signed=True),
    ]
    name = f"**{entry['name']}**" if bold else entry["name"]
    return f"| {name} | " + " | ".join(cells) + " |"


# --------------------------------------------------------------------------------------------
# Paired CV studies


def _share_splits(reference: Path, run_dir: Path) -> None:
    """Give ``run_dir`` the reference run's ``splits.json`` before it starts, so the folds are identical."""
    source, target = RunDir(reference), RunDir(run_dir)
    if target.splits_path.is_file():
        if target.read_splits() != source.read_splits():
            raise StudyError(
                f"{target.splits_path} differs from {source.splits_path}: the study's runs must share their folds; use a new --out"
            )
        return
    target.path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.splits_path, target.splits_path)


class CVOptions(TypedDict, total=False):
    """How a paired study cross-validates each arm: keywords of :func:`polypseg.experiments.cv.run_cv`.

    ``folds`` (default 5) and ``seed`` (default 0) fix the first arm's split, which every arm shares;
    ``resume``, ``device``, ``progress``, ``explain`` (Grad-CAM checks per fold), ``cache_dir`` and
    ``report`` mean what they mean for ``run_cv``.
    """

    folds: int
    seed: int
    resume: bool
    device: str
    progress: bool
    explain: bool
    cache_dir: Path | str | None
    report: bool


def run_paired_study(
    data: Path | str, out: Path | str, arms: dict[str, RunConfig], **options: Unpack[CVOptions]
) -> list[Path]:
    """Cross-validate each configuration in ``arms`` into ``OUT/<arm>`` on the first arm's folds."""
    from polypseg.experiments.cv import run_cv

    out = Path(out)
    progress = options.get("progress", True)
    options = {"folds": 5, "seed": 0, **options}
    dirs = [out / name for name in arms]
    for i, (run_dir, config) in enumerate(zip(dirs, arms.values(), strict=False)):
        if i > 0:
            _share_splits(dirs[0], run_dir)
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"[bold]{out.name}[/]: run {i + 1}/{len(dirs)} -> {run_dir}", highlight=False)
        run_cv(data, run_dir, config, **options)
    return dirs


def write_paired_study(
    out: Path, name: str, title: str, intro: list[str], runs: Sequence[Path], metrics: Sequence[str]
) -> dict[str, Any]:
    """Compare the study's runs at 0.5 and at each run's chosen threshold; write ``OUT/<name>.{md,json}``."""
    from polypseg.reporting.compare import compare_runs, test_notes

    fixed = compare_runs(runs, threshold=0.5)
    chosen = compare_runs(runs, threshold="chosen")
    k = len(fixed.reference.folds)
    lines = [f"# {title}", "", *intro, ""]
    lines += [f"## At threshold 0.5 (the same for every run; {k} folds, identical splits)", "", *fixed.table_lines()]
    for metric in metrics:
        lines += ["", *fixed.test_lines(metric, heading="###")]
    lines += [
        "",
        "## At each run's chosen threshold (" + ", ".join(f"{r.name} {r.threshold:g}" for r in chosen.runs) + ")",
        "",
        *chosen.table_lines(),
        "",
        *test_notes(k),
    ]
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    payload = {
        "study": name,
        "polypseg_version": __version__,
        "runs": [str(r) for r in runs],
        "at_0.5": fixed.to_dict(),
        "at_chosen": chosen.to_dict(),
    }
    atomic_write_json(out / f"{name}.json", payload)
    return payload


def run_skip_ablation(
    data: Path | str, out: Path | str, config: RunConfig, **options: Unpack[CVOptions]
) -> dict[str, Any]:
    """U-Net with vs without skip connections, same recipe, seed and folds; writes ``OUT/skip_ablation.{md,json}``."""
    with_skips, no_skips = _copy_config(config), _copy_config(config)
    with_skips.model.skip_connections, no_skips.model.skip_connections = True, False
    if with_skips.model.arch != "unet":
        raise StudyError(f"the skip ablation is defined for arch 'unet', not '{with_skips.model.arch}'")
    runs = run_paired_study(data, out, {"with-skips": with_skips, "no-skips": no_skips}, **options)
    intro = [
        f"U-Net / {config.model.encoder} (encoder init `{config.model.encoder_weights}`), recipe `{config.train.recipe}`, "
        f"with and without its skip connections, trained on identical folds with the same seed.",
        "The no-skip decoder keeps the same blocks and widths but sees only the upsampled bottleneck path, so all spatial "
        "detail must pass through the 1/32-resolution features: boundary F1 measures the expected loss of contour quality.",
        f"Runs: `{runs[0]}`, `{runs[1]}`.",
    ]
    return write_paired_study(
        Path(out), "skip_ablation", "Skip-connection ablation", intro, runs, ("dice", "iou", "boundary_f1")
    )


def run_encoder_init(
    data: Path | str,
    out: Path | str,
    config: RunConfig,
    imagenet_weights: str = "imagenet",
    **options: Unpack[CVOptions],
) -> dict[str, Any]:
    """ImageNet vs random encoder initialisation on identical folds; writes ``OUT/encoder_init.{md,json}``.

    Stops before any training, with a one-line :class:`~polypseg.models.factory.EncoderWeightsError`, when
    the ImageNet weights cannot be had (offline without a cache, or a bad ``imagenet_weights`` file).
    """
    from polypseg.models.factory import EncoderWeightsError, create_model

    out = Path(out)
    pretrained, scratch = _copy_config(config), _copy_config(config)
    saved = RunDir(out / "imagenet").saved_settings()
    weights = saved.config.model.encoder_weights if saved is not None else imagenet_weights
    pretrained.model.encoder_weights = weights
    scratch.model.encoder_weights = "none"
    try:
        create_model(pretrained.model)  # fail fast: before caching data or training the other arm
    except EncoderWeightsError as error:
        raise EncoderWeightsError(
            f"encoder-init study stopped before training (nothing was run): {error} For this study, give the "
            "ImageNet arm's weights with --encoder-weights PATH; the random arm needs none."
        ) from None
    runs = run_paired_study(data, out, {"imagenet": pretrained, "random": scratch}, **options)
    intro = [
        f"U-Net / {config.model.encoder}, recipe `{config.train.recipe}`, encoder initialised from ImageNet weights "
        f"(`{weights}`) vs randomly, trained on identical folds with the same seed. The paper uses ImageNet weights.",
        f"Runs: `{runs[0]}`, `{runs[1]}`.",
    ]
    return write_paired_study(
        out, "encoder_init", "Encoder initialisation: ImageNet vs random", intro, runs, ("dice", "iou", "boundary_f1")
    )


# --------------------------------------------------------------------------------------------
# PraNet protocol


def literature_metrics(probabilities: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, float] | None:
    """S-measure, weighted F, E-measure (mean, max, adaptive) and MAE with ``pysodmetrics``; None if not installed.

    Inputs are float probability maps in [0, 1] and binary masks at the same (original) size. As in the
    polyp literature's evaluation toolbox, each map is saved as 8-bit and min-max normalised.
    """
    try:
        import py_sod_metrics as sod
    except ImportError:
        return None
    sm, wfm, em, mae = sod.Smeasure(), sod.WeightedFmeasure(), sod.Emeasure(), sod.MAE()
    for prob, mask in zip(probabilities, masks, strict=False):
        pred = np.clip(np.round(np.asarray(prob, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
        gt = np.asarray(mask, dtype=bool).astype(np.uint8) * 255
        for metric in (sm, wfm, em, mae):
            metric.step(pred=pred, gt=gt)
    curve = np.asarray(em.get_results()["em"]["curve"], dtype=np.float64)
    return {
        "s_measure": float(sm.get_results()["sm"]),
        "weighted_f": float(wfm.get_results()["wfm"]),
        "mean_e_measure": float(curve.mean()),
        "max_e_measure": float(curve.max()),
        "adaptive_e_measure": float(em.get_results()["em"]["adp"]),
        "mae": float(mae.get_results()["mae"]),
    }


def run_pranet(
    data: Path | str,
    test_list: Path | str,
    out: Path | str,
    config: RunConfig,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    cache_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Train on ``data`` minus ``test_list``, test once on ``test_list``; writes ``OUT/pranet.{md,json}``.

    The test images are scored at their original resolution (probabilities upsampled bilinearly,
    then thresholded at 0.5), as the literature does, and at the model's resolution.
    """
    from polypseg.training.train_split import train_single_split

    out = Path(out)
    test_list = Path(test_list)
    if not test_list.is_file():
        raise StudyError(f"--test-list {test_list}: file not found")
    run = RunDir(out)
    if run.history_path().is_file() and not resume:
        raise StudyError(f"{out} already holds a training run; pass --resume to continue it, or choose a new --out")
    # With resume, train_single_split refuses a config that differs from the saved one.
    train_single_split(
        data, out, config, test_list=test_list, resume=resume, device=device, progress=progress, cache_dir=cache_dir
    )
    return evaluate_pranet(out, data, test_list, device=device, cache_dir=cache_dir, progress=progress)


def evaluate_pranet(
    train_dir: Path | str,
    data: Path | str,
    test_list: Path | str,
    device: str = "auto",
    cache_dir: Path | str | None = None,
    progress: bool = True,
    tta_flip: bool | None = None,
) -> dict[str, Any]:
    """Score ``TRAIN_DIR/best`` once on the stems of ``test_list``; writes ``pranet.{md,json}`` there.

    ``tta_flip`` overrides the recipe's flip test-time augmentation (files ``pranet_tta.*`` or
    ``pranet_no_tta.*`` where that changes it)."""
    run = RunDir(train_dir)
    torch_device = resolve_device(device)
    checkpoint = load_checkpoint(run.best_checkpoint(), device=torch_device)
    size = checkpoint.config.train.image_size
    stems = load_split_file(test_list)
    test = build_cache(data, size, cache_dir=cache_dir, progress=progress).subset(stems)
    recipe = _with_tta(checkpoint.config.train, tta_flip)
    probs = predict_with_recipe(checkpoint.model, test.images, recipe, torch_device)
    at_model = _model_metrics(probs, test.masks, (0.5,), default_tolerance(size))["0.5"]

    original = _original_resolution(data, stems, probs, progress)
    if original is not None:
        scores, full_probs, full_masks = original
        literature = literature_metrics(full_probs, full_masks)
        literature_resolution = "original"
    else:  # a cache file: the original masks are not there, so everything is at model resolution
        scores = None
        literature = literature_metrics(list(probs.numpy()), list(test.masks))
        literature_resolution = (
            f"{size} px (model resolution: the data is a cache file, the original masks are not available)"
        )
    per_image = evaluate_probabilities(probs, test.masks, thresholds=(0.5,)).per_image(0.5)
    result: dict[str, Any] = {
        "polypseg_version": __version__,
        "checkpoint": str(run.best_checkpoint().with_suffix(".safetensors")),
        "data": str(Path(data).resolve()),
        "test_list": str(test_list),
        "n_test": len(stems),
        "threshold": 0.5,
        "tta_flip": recipe.tta_flip,
        "original_resolution": None if scores is None else {k: float(np.mean(v)) for k, v in scores.items()},
        "model_resolution": {
            "size": size,
            "mdice": at_model["dice"],
            "miou": at_model["iou"],
            "boundary_f1": at_model["boundary_f1"],
        },
        "literature_metrics": literature,
        "literature_metrics_resolution": literature_resolution if literature is not None else None,
        "literature": PRANET_LITERATURE,
        "per_image": {
            "stems": stems,
            "dice": [round(float(d), 6) for d in (scores["mdice"] if scores else per_image["dice"])],
            "iou": [round(float(v), 6) for v in (scores["miou"] if scores else per_image["iou"])],
            "resolution": "original" if scores else f"{size} px",
        },
    }
    result["ci95"] = {
        "method": "percentile bootstrap over the test images, 10000 resamples, seed 0",
        "resolution": result["per_image"]["resolution"],
        "mdice": list(bootstrap_ci(result["per_image"]["dice"])),
        "miou": list(bootstrap_ci(result["per_image"]["iou"])),
    }
    split = run.read_split()
    if split is not None:
        result["n_train"], result["n_val"] = len(split["train"]), len(split["val"])
    name = f"pranet{_tta_suffix(checkpoint.config.train, tta_flip)}"
    atomic_write_json(run.path / f"{name}.json", result)
    atomic_write_text(run.path / f"{name}.md", pranet_markdown(result))
    return result


def _original_resolution(
    data: Path | str, stems: Sequence[str], probs: torch.Tensor, progress: bool
) -> tuple[dict[str, list[float]], list[np.ndarray], list[np.ndarray]] | None:
    """Per-image scores at each image's original size (probabilities upsampled bilinearly, then
    thresholded at 0.5); None when ``data`` is a cache file without the original masks."""
    from polypseg.data.transforms import resize_probabilities

    if Path(data).suffix == ".npz":
        return None
    by_stem = {s.stem: s for s in index_dataset(data).samples}
    scores: dict[str, list[float]] = {"mdice": [], "miou": [], "boundary_f1": []}
    full_probs, full_masks = [], []
    items: Any = list(enumerate(stems))
    if progress:
        from rich.progress import track

        items = track(items, description="scoring at original resolution", transient=True)
    for i, stem in items:
        mask = read_mask(by_stem[stem].mask)
        prob = resize_probabilities(probs[i][None, None], mask.shape)[0, 0]
        pred, target = (prob >= 0.5)[None], torch.from_numpy(mask)[None]
        scores["mdice"].append(float(dice_score(pred, target)[0]))
        scores["miou"].append(float(iou_score(pred, target)[0]))
        scores["boundary_f1"].append(float(boundary_f1(pred, target, default_tolerance(max(mask.shape)))[0]))
        full_probs.append(prob.numpy())
        full_masks.append(mask)
    return scores, full_probs, full_masks


def pranet_markdown(result: dict[str, Any]) -> str:
    """The PraNet-protocol table of :func:`evaluate_pranet`'s result, with the literature's numbers."""
    lit = result["literature_metrics"]
    full, model = result["original_resolution"], result["model_resolution"]
    extra_names = ("s_measure", "weighted_f", "mean_e_measure", "max_e_measure", "mae")
    lines = [
        "# PraNet protocol on Kvasir-SEG",
        "",
        f"Trained once on the data minus the {result['n_test']} images of `{result['test_list']}`"
        + (
            f" ({result['n_train']} training, {result['n_val']} inner-validation images for the best epoch)"
            if "n_train" in result
            else ""
        )
        + f", tested once on those {result['n_test']} images at threshold 0.5. mDice and mIoU are per-image means."
        + (" Flip test-time augmentation (mean of the image and its two flips)." if result.get("tta_flip") else ""),
        "",
        "| | mDice | mIoU | boundary F1 | S-measure | weighted F | mean E | max E | MAE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lit_cells = [_f(lit[k]) for k in extra_names] if lit else ["n/a"] * len(extra_names)
    at_original = full is not None
    if at_original:
        lines.append(
            f"| ours, original resolution | {_f(full['mdice'])} | {_f(full['miou'])} | {_f(full['boundary_f1'])} | "
            + " | ".join(lit_cells)
            + " |"
        )
    model_cells = " | ".join(lit_cells) if not at_original else " |" * (len(extra_names) - 1)
    lines.append(
        f"| ours, {model['size']} px | {_f(model['mdice'])} | {_f(model['miou'])} | {_f(model['boundary_f1'])} | {model_cells} |"
    )
    for name, values in result["literature"].items():
        lines.append(f"| {name} | {values['mdice']:.3f} | {values['miou']:.3f} | |" + " |" * len(extra_names))
    lines.append("")
    ci = result.get("ci95")
    if ci:
        lines.append(
            f"95% intervals ({ci['method']}, {ci['resolution']} resolution): mDice {_f(ci['mdice'][0])}-{_f(ci['mdice'][1])}, "
            f"mIoU {_f(ci['miou'][0])}-{_f(ci['miou'][1])}."
        )
    if not at_original:
        lines.append(
            "The data given is a cache file: scores are at the model's resolution, not the images' original one."
        )
    if lit:
        lines.append(
            "S-measure, weighted F, E-measure and MAE: `pysodmetrics`, on 8-bit probability maps min-max normalised per image "
            "as in the literature's evaluation toolbox; max E is the E-measure maximised over thresholds (PraNet's E^max)."
        )
    else:
        lines.append(
            "S-measure, weighted F, E-measure and MAE need `pysodmetrics`: `pip install 'polypseg[literature]'`."
        )
    lines.append(
        "Literature rows: as reported by PraNet (Fan et al., MICCAI 2020, Table 1) on the same 100 test images."
    )
    return "\n".join(lines) + "\n"
