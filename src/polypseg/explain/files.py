"""Explain image files into a folder: Grad-CAM heatmaps, panels, metrics.csv, summary.json and a gallery.

What ``polypseg explain`` does, for Python callers too: :func:`explain_files`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polypseg.core.rules import check_threshold
from polypseg.core.runs import parse_fold_name
from polypseg.errors import PolypsegError

log = logging.getLogger(__name__)

HEATMAP_FORMATS = ("npy", "png16")
# Heatmaps are written at the image's size up to this many pixels, above it scaled down to fit
# (keeping the aspect ratio): a Grad-CAM map made at the model's 256 px carries no finer detail.
MAX_HEATMAP_PIXELS = 4_000_000
PANEL_SIDE = 1024  # panels are drawn from copies at most this long on their longer side
CSV_COLUMNS = (
    "stem",
    "image",
    "has_ground_truth",
    "dice",
    "iou",
    "predicted_area",
    "energy_inside",
    "pointing_game",
    "topk_iou",
    "deletion_auc",
    "insertion_auc",
)


def explain_files(
    inputs: Sequence[Path],
    out: Path,
    model: Path | str | None = None,
    masks: Path | None = None,
    layer: str = "decoder.final",
    method: str = "gradcam",
    threshold: float | None = None,
    device: str = "auto",
    batch_size: int = 8,
    heatmap_format: str = "npy",
    gallery: bool = True,
    fold: int | None = None,
    topk: float = 0.15,
    deletion_steps: int = 16,
    precision: str = "auto",
    engine: str = "torch",
    warn: Callable[[str], None] = log.warning,
    say: Callable[[str], None] = log.info,
    progress: bool = True,
) -> dict[str, Any]:
    """Explain ``inputs`` into ``out``; returns the summary written to ``summary.json``.

    ``model`` None is the shipped model (:mod:`polypseg.models.pretrained`); no ``inputs`` is the
    bundled Kvasir-SEG sample (40 of the test images the shipped model never saw, with masks).
    Inputs are collected by :func:`polypseg.data.inputs.collect_inputs` (with ground truth) and bad
    ones follow :mod:`polypseg.data.inputs` (skip, name the cause through ``warn``, count them at the
    end; ``skipped.csv``). ``say`` hears notes (which model explains, where masks were found).
    The model works at its own resolution; full-size maps are made only for what is written and
    measured, piece by piece (heatmaps at most :data:`MAX_HEATMAP_PIXELS`, panels drawn from
    copies at most :data:`PANEL_SIDE` px long). Options are checked first, each error naming its
    command-line option. ``engine`` ``onnxruntime`` or ``openvino`` computes the heatmaps on that
    CPU engine (:mod:`polypseg.explain.engine_gradcam`: the paper's Grad-CAM only, same heatmaps); the
    explanation metrics still run the model in torch.
    """
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from polypseg.core.devices import resolve_device
    from polypseg.core.io_utils import atomic_write, atomic_write_json, display_name
    from polypseg.data.datasets import ImageReadError, read_image, read_mask, resize_image, resize_mask
    from polypseg.data.inputs import (
        UNREADABLE,
        InputFile,
        InputProblem,
        SkipLog,
        check_pixels,
        collect_inputs,
        one_line_warnings,
        prepare_output_folder,
        write_csv,
    )
    from polypseg.explain.gallery import render_panel, write_gallery
    from polypseg.explain.gradcam import METHODS, GradCAMDriver, MaskedLogitSum, resize_heatmap, resolve_layer
    from polypseg.explain.metrics import METRIC_KEYS, METRIC_SCALES, explanation_report, score_explanations
    from polypseg.inference.inferer import batch_slices, use_precision_layout
    from polypseg.inference.masks import upsample_mask
    from polypseg.metrics.segmentation import dice_score, iou_score
    from polypseg.models.checkpoint import load_checkpoint

    if heatmap_format not in HEATMAP_FORMATS:
        raise PolypsegError(f"--heatmap-format {heatmap_format}: use one of {', '.join(HEATMAP_FORMATS)}")
    if method not in METHODS:
        raise PolypsegError(f"--method {method}: use one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise PolypsegError(f"--batch-size {batch_size}: must be >= 1")
    if deletion_steps < 0:
        raise PolypsegError(f"--deletion-steps {deletion_steps}: must be >= 0 (0 skips deletion/insertion)")
    if not 0 < topk <= 1:
        raise PolypsegError(f"--topk {topk}: must be in (0, 1]")
    if threshold is not None:
        check_threshold(threshold, "--threshold")
    if out.exists() and not out.is_dir():
        prepare_output_folder(out)  # one line naming --out, before any work
    from polypseg.core.precision import check_precision
    from polypseg.models.pretrained import resolve_model

    check_precision(precision, "--precision")
    from polypseg.explain.engine_gradcam import ENGINES

    engines = ("torch", *ENGINES)
    if engine not in engines:
        raise PolypsegError(f"--engine {engine}: choose one of {', '.join(engines)}")
    if engine != "torch" and (method != "gradcam" or layer != "decoder.final"):
        raise PolypsegError(
            f"--engine {engine} computes the paper's Grad-CAM (--method gradcam --layer decoder.final) only"
        )
    model_path = resolve_model(model)
    if not inputs:
        from polypseg.data.sample_data import sample_dataset_path

        inputs = [sample_dataset_path()]
    skips = SkipLog(warn)
    with one_line_warnings(warn):
        device = str(resolve_device(device, label="--device"))
        if engine != "torch" and device != "cpu":
            raise PolypsegError(f"--engine {engine} runs on the CPU; pass --device cpu or --engine torch")
        from polypseg.models.checkpoint import pick_checkpoint

        checkpoint_path = pick_checkpoint(model_path, fold)
        checkpoint = load_checkpoint(checkpoint_path, device=device)
        net = checkpoint.model
        try:
            resolve_layer(net, layer)
        except Exception as error:  # noqa: BLE001 - the message already names the layer
            raise PolypsegError(f"--layer {layer}: {error}") from None
        use_precision_layout(net, device, precision)
        threshold = checkpoint.threshold if threshold is None else threshold
        size = checkpoint.config.train.image_size
        items = collect_inputs(inputs, skips, ground_truth=True, masks=masks, notify=say, exclude=out)
        if not items:
            named = "; ".join(detail for _, _, detail in skips.entries) or "no inputs"
            raise PolypsegError(f"no input images to explain ({named})")
        prepare_output_folder(out)
        model_note, model_fold = _model_note(model_path, checkpoint_path, fold)
        say(model_note)

        records: list[dict[str, Any]] = []
        panels: dict[str, Path] = {}
        columns = (TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        if engine == "torch":
            driver: Any = GradCAMDriver(
                net, layer, method, image_size=size, device=device, precision=precision, batch_size=batch_size
            )
        else:
            from polypseg.explain.engine_gradcam import EngineGradCAMDriver

            driver = EngineGradCAMDriver(net, checkpoint_path, engine, precision, image_size=size, layer=layer)
        with Progress(*columns, console=Console(stderr=True), transient=True, disable=not progress) as bar, driver:
            task = bar.add_task("explain", total=len(items))
            for chunk in batch_slices(len(items), batch_size):
                loaded: list[tuple[InputFile, np.ndarray, np.ndarray | None]] = []
                for item in items[chunk]:
                    try:
                        check_pixels(item.path)
                        image = read_image(item.path)
                    except InputProblem as problem:
                        skips.skip(item.path, problem)
                        bar.advance(task)
                        continue
                    except ImageReadError as error:
                        skips.skip(item.path, InputProblem(UNREADABLE, str(error)))
                        bar.advance(task)
                        continue
                    truth = None
                    if item.mask is not None:
                        try:
                            check_pixels(item.mask)
                            truth = read_mask(item.mask)
                        except (ImageReadError, InputProblem) as error:
                            warn(f"{error}; {display_name(item.path.name)} explained without ground truth")
                        if truth is not None and truth.shape != image.shape[:2]:
                            warn(
                                f"{item.mask}: mask size {truth.shape[::-1]} differs from image "
                                f"{image.shape[1::-1]}; no ground truth used"
                            )
                            truth = None
                    loaded.append((item, image, truth))
                if not loaded:
                    continue
                cams = driver.run([image for _, image, _ in loaded], MaskedLogitSum(threshold))
                batch, heatmaps, logits = cams.inputs, cams.heatmaps, cams.logits
                gt_small = np.stack(
                    [resize_mask(t, size) if t is not None else np.zeros((size, size), bool) for _, _, t in loaded]
                )
                scored = score_explanations(
                    net,
                    batch,
                    heatmaps,
                    logits,
                    gt_small,
                    threshold,
                    topk,
                    deletion_steps,
                    max(batch_size, 2 * deletion_steps),
                    precision,
                    logits_from_model=engine == "torch",  # another engine's logits: torch rescores the original
                )
                probs = torch.sigmoid(logits[:, 0]).float().cpu().numpy()
                for (item, image, truth), heatmap, prob, record in zip(
                    loaded, heatmaps.cpu(), probs, scored, strict=False
                ):
                    shape = image.shape[:2]
                    prediction, _ = upsample_mask(prob, shape, threshold)
                    row: dict[str, Any] = {
                        "stem": item.name,
                        "image": display_name(item.path),
                        "has_ground_truth": truth is not None,
                        "predicted_area": float(np.count_nonzero(prediction)) / max(prediction.size, 1),
                        "dice": float("nan"),
                        "iou": float("nan"),
                        **record,
                    }
                    if truth is not None:
                        pred_t, truth_t = torch.from_numpy(prediction), torch.from_numpy(truth)
                        row["dice"] = float(dice_score(pred_t, truth_t)[0])
                        row["iou"] = float(iou_score(pred_t, truth_t)[0])
                    del prediction
                    _write_heatmap(
                        out / item.name, resize_heatmap(heatmap, _fit(shape, MAX_HEATMAP_PIXELS)), heatmap_format
                    )
                    shown = _fit(shape, max_side=PANEL_SIDE)
                    small_image = image if shown == shape else resize_image(image, shown)
                    small_truth = None if truth is None else (truth if shown == shape else resize_mask(truth, shown))
                    small_prediction, _ = upsample_mask(prob, shown, threshold)
                    title = f"{item.name}" + (f"  Dice {row['dice']:.3f}" if truth is not None else "")
                    png = render_panel(
                        small_image, resize_heatmap(heatmap, shown), small_prediction, small_truth, title=title
                    )
                    panel_path = out / f"{item.name}_panel.png"
                    atomic_write(panel_path, lambda tmp, data=png: tmp.write_bytes(data))
                    panels[item.name] = panel_path
                    records.append(row)
                    bar.advance(task)
                del loaded, batch

        report = explanation_report(records, keys=("dice", "iou", *METRIC_KEYS[1:]))
        write_csv(
            out / "metrics.csv",
            CSV_COLUMNS,
            [{k: _csv_value(r.get(k, float("nan"))) for k in CSV_COLUMNS} for r in records],
        )
        with_truth = sum(1 for r in records if r["has_ground_truth"])
        summary = {
            "checkpoint": str(checkpoint.path),
            "model": model_note,
            "fold": model_fold,
            "explained": len(records),
            "with_ground_truth": with_truth,
            "skipped": skips.names,
            "skipped_causes": [
                {"file": name, "cause": cause, "reason": detail} for name, cause, detail in skips.entries
            ],
            "mean_std": report["mean_std"],
            "metric_scales": METRIC_SCALES,
            "settings": {
                "layer": layer,
                "method": method,
                "threshold": threshold,
                "image_size": size,
                "topk": topk,
                "deletion_steps": deletion_steps,
                "deletion_baseline": "mean",
                "insertion_baseline": "blur",
                "device": device,
                "precision": precision,
                "heatmap_max_pixels": MAX_HEATMAP_PIXELS,
            },
        }
        atomic_write_json(out / "summary.json", summary)
        if skips:
            skips.write_csv(out / "skipped.csv")
        if gallery and records:
            notes = [f"{model_note}; layer {layer}; method {method}; threshold {threshold:g}"]
            if skips:
                notes.append(
                    f"{len(skips)} input(s) skipped ({skips.counts()}): " + ", ".join(Path(s).name for s in skips.names)
                )
            notes += [f"{name}: {text}" for name, text in METRIC_SCALES.items() if name in report["mean_std"]]
            write_gallery(out / "gallery.html", records, panels, summary=report["mean_std"], notes=notes)
    return summary


def _model_note(model: Path, checkpoint: Path, fold: int | None) -> tuple[str, int | None]:
    """Which model explains the images, in words, and its fold (None for a lone checkpoint)."""
    from polypseg.models.checkpoint import find_checkpoints

    index = parse_fold_name(checkpoint.parent.name)
    folds = len(find_checkpoints(model)) if model.is_dir() else 1
    if index is None:
        return f"explained with the model {checkpoint}", None
    if folds > 1:
        how = "chosen with --fold" if fold is not None else "the default; --fold K picks another"
        return (
            f"explained with fold {index}'s model ({checkpoint}; {how}; Grad-CAM explains one model, not the {folds}-fold ensemble)",
            index,
        )
    return f"explained with fold {index}'s model ({checkpoint})", index


def _write_heatmap(path_stem: Path, heatmap: np.ndarray, fmt: str) -> Path:
    from polypseg.core.io_utils import atomic_write

    if fmt == "npy":
        path = path_stem.with_name(path_stem.name + "_heatmap.npy")

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:  # a file object: np.save would append ".npy" to a bare path
                np.save(handle, heatmap.astype(np.float32))

        atomic_write(path, write)
    else:
        from PIL import Image

        path = path_stem.with_name(path_stem.name + "_heatmap.png")
        levels = np.round(np.clip(heatmap, 0, 1) * 65535).astype(np.uint16)
        atomic_write(path, lambda tmp: Image.fromarray(levels).save(tmp, format="PNG"))
    return path


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _fit(shape: tuple[int, int], max_pixels: int | None = None, max_side: int | None = None) -> tuple[int, int]:
    height, width = shape
    scale = 1.0
    if max_pixels is not None and height * width > max_pixels:
        scale = min(scale, (max_pixels / (height * width)) ** 0.5)
    if max_side is not None and max(height, width) > max_side:
        scale = min(scale, max_side / max(height, width))
    return (max(1, round(height * scale)), max(1, round(width * scale))) if scale < 1 else (height, width)
