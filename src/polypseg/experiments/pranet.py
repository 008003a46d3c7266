"""The PraNet protocol: train once on Kvasir-SEG minus the 100 listed test images, test once on them,
and score as the polyp literature does (``polypseg study pranet``, docs/studies.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polypseg._version import __version__
from polypseg.core.config import RunConfig
from polypseg.core.devices import resolve_device
from polypseg.core.io_utils import atomic_write_json, atomic_write_text
from polypseg.core.runs import RunDir
from polypseg.data.cache import build_cache
from polypseg.data.images import read_mask
from polypseg.data.pairing import index_dataset
from polypseg.data.splits import load_split_file
from polypseg.experiments.study_common import StudyError, model_metrics, score_text, tta_suffix, with_tta
from polypseg.metrics.boundary import boundary_f1, default_tolerance
from polypseg.metrics.segmentation import bootstrap_ci, dice_score, iou_score
from polypseg.models.checkpoint import load_checkpoint
from polypseg.training.evaluation import evaluate_probabilities
from polypseg.training.loop import predict_with_recipe

# As reported by PraNet (Fan et al., MICCAI 2020, Table 1) on the same 100 Kvasir-SEG test images.
PRANET_LITERATURE = {
    "U-Net (as reported by PraNet)": {"mdice": 0.818, "miou": 0.746},
    "U-Net++ (as reported by PraNet)": {"mdice": 0.821, "miou": 0.743},
    "PraNet": {"mdice": 0.898, "miou": 0.840},
}


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
    *,
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
    recipe = with_tta(checkpoint.config.train, tta_flip)
    probs = predict_with_recipe(checkpoint.model, test.images, recipe, torch_device)
    at_model = model_metrics(probs, test.masks, (0.5,), default_tolerance(size))["0.5"]

    scores, literature, literature_resolution = _scores_beyond_model_resolution(
        data, stems, probs, test.masks, size, progress
    )
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
        "per_image": _per_image_scores(stems, scores, probs, test.masks, size),
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
    name = f"pranet{tta_suffix(checkpoint.config.train, tta_flip)}"
    atomic_write_json(run.path / f"{name}.json", result)
    atomic_write_text(run.path / f"{name}.md", pranet_markdown(result))
    return result


def _scores_beyond_model_resolution(
    data: Path | str, stems: Sequence[str], probs: torch.Tensor, masks: np.ndarray, size: int, progress: bool
) -> tuple[dict[str, list[float]] | None, dict[str, float] | None, str]:
    """Per-image scores at the original resolution (None for a cache file), the literature metrics
    (None without ``pysodmetrics``) and the resolution those metrics were computed at."""
    original = _original_resolution(data, stems, probs, progress)
    if original is not None:
        scores, full_probs, full_masks = original
        return scores, literature_metrics(full_probs, full_masks), "original"
    # A cache file: the original masks are not there, so everything is at model resolution.
    resolution = f"{size} px (model resolution: the data is a cache file, the original masks are not available)"
    return None, literature_metrics(list(probs.numpy()), list(masks)), resolution


def _per_image_scores(
    stems: Sequence[str], scores: dict[str, list[float]] | None, probs: torch.Tensor, masks: np.ndarray, size: int
) -> dict[str, Any]:
    """Per-image Dice and IoU at 0.5: at the original resolution where ``scores`` has them, else at the model's."""
    if scores is not None:
        dice, iou, resolution = scores["mdice"], scores["miou"], "original"
    else:
        per_image = evaluate_probabilities(probs, masks, thresholds=(0.5,)).per_image(0.5)
        dice, iou, resolution = per_image["dice"], per_image["iou"], f"{size} px"
    return {
        "stems": stems,
        "dice": [round(float(d), 6) for d in dice],
        "iou": [round(float(v), 6) for v in iou],
        "resolution": resolution,
    }


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
    lit_cells = [score_text(lit[k]) for k in extra_names] if lit else ["n/a"] * len(extra_names)
    at_original = full is not None
    if at_original:
        lines.append(
            f"| ours, original resolution | {score_text(full['mdice'])} | {score_text(full['miou'])} | {score_text(full['boundary_f1'])} | "
            + " | ".join(lit_cells)
            + " |"
        )
    model_cells = " | ".join(lit_cells) if not at_original else " |" * (len(extra_names) - 1)
    lines.append(
        f"| ours, {model['size']} px | {score_text(model['mdice'])} | {score_text(model['miou'])} | {score_text(model['boundary_f1'])} | {model_cells} |"
    )
    for name, values in result["literature"].items():
        lines.append(f"| {name} | {values['mdice']:.3f} | {values['miou']:.3f} | |" + " |" * len(extra_names))
    lines.append("")
    ci = result.get("ci95")
    if ci:
        lines.append(
            f"95% intervals ({ci['method']}, {ci['resolution']} resolution): mDice {score_text(ci['mdice'][0])}-{score_text(ci['mdice'][1])}, "
            f"mIoU {score_text(ci['miou'][0])}-{score_text(ci['miou'][1])}."
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
