"""``polypseg explain``: Grad-CAM panels, raw heatmaps, measured explanation quality and a gallery."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from polypseg.cli.common import UsageError, console

HEATMAP_FORMATS = ("npy", "png16")
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


@dataclass
class _Item:
    stem: str
    image: Path
    mask: Path | None = None


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _is_image(path: Path) -> bool:
    from polypseg.data import IMAGE_EXTENSIONS

    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def collect_inputs(inputs: list[Path], masks: Path | None) -> list[_Item]:
    """Image files, image folders and dataset roots (``images/`` + ``masks/``) -> items with optional masks."""
    from polypseg.data import DataError, find_layout, index_dataset

    items: list[_Item] = []
    for path in inputs:
        if path.is_file():
            if _is_image(path):
                items.append(_Item(path.stem, path))
            else:
                _warn(f"{path}: not an image file (by extension); skipped")
            continue
        if not path.is_dir():
            raise UsageError(f"input not found: {path}")
        try:
            find_layout(path)
        except DataError:
            found = sorted(p for p in path.iterdir() if _is_image(p))
            if not found:
                _warn(f"{path}: no image files found; skipped")
            items += [_Item(p.stem, p) for p in found]
            continue
        index = index_dataset(path)
        items += [_Item(s.stem, s.image, s.mask) for s in index.samples]
        items += [_Item(p.stem, p) for p in index.unpaired_images]
    if masks is not None:
        if not masks.is_dir():
            raise UsageError(f"--masks {masks}: not a folder")
        by_stem = {p.stem: p for p in sorted(masks.iterdir()) if _is_image(p)}
        for item in items:
            if item.mask is None:
                item.mask = by_stem.get(item.stem)
                if item.mask is None:
                    _warn(f"{item.image}: no mask named '{item.stem}.*' in {masks}; no ground truth for it")
    seen: dict[str, int] = {}
    for item in items:  # output files are named by stem: keep them distinct
        count = seen.get(item.stem, 0)
        seen[item.stem] = count + 1
        if count:
            new = f"{item.stem}_{count + 1}"
            _warn(f"{item.image}: another input has the stem '{item.stem}'; its outputs are named '{new}'")
            item.stem = new
    return items


def _pick_checkpoint(model: Path, fold: int | None) -> Path:
    from polypseg.checkpoint import find_checkpoints

    paths = find_checkpoints(model)
    if len(paths) == 1:
        if fold is not None and paths[0].parent.name != f"fold_{fold}":
            raise UsageError(f"--fold {fold}: {model} is a single checkpoint, not a CV run folder")
        return paths[0]
    wanted = f"fold_{0 if fold is None else fold}"
    for path in paths:
        if path.parent.name == wanted:
            return path
    available = ", ".join(p.parent.name.removeprefix("fold_") for p in paths)
    raise UsageError(f"--fold {fold}: {model} has folds {available}")


def _write_heatmap(path_stem: Path, heatmap: np.ndarray, fmt: str) -> Path:
    from polypseg.io_utils import atomic_write

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


def _write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    from polypseg.io_utils import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _csv_value(record.get(k, float("nan"))) for k in CSV_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def run_explain(
    model_path: Path,
    inputs: list[Path],
    out: Path,
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
) -> dict[str, Any]:
    """The command's body (also usable from Python); returns the summary written to ``summary.json``."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from polypseg.checkpoint import load_checkpoint
    from polypseg.cli.common import resolve_device
    from polypseg.data import ImageReadError, read_image, read_mask, resize_mask
    from polypseg.explain import (
        METHODS,
        MaskedLogitSum,
        SegmentationGradCAM,
        autocast_for,
        prepare_batch,
        resolve_layer,
        to_original_size,
    )
    from polypseg.explain_metrics import METRIC_KEYS, explanation_report, score_explanations
    from polypseg.gallery import render_panel, write_gallery
    from polypseg.io_utils import atomic_write, atomic_write_json
    from polypseg.metrics import dice_score, iou_score

    if heatmap_format not in HEATMAP_FORMATS:
        raise UsageError(f"--heatmap-format {heatmap_format}: use one of {', '.join(HEATMAP_FORMATS)}")
    if method not in METHODS:
        raise UsageError(f"--method {method}: use one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    if deletion_steps < 0:
        raise UsageError(f"--deletion-steps {deletion_steps}: must be >= 0 (0 skips deletion/insertion)")
    if not 0 < topk <= 1:
        raise UsageError(f"--topk {topk}: must be in (0, 1]")
    if threshold is not None and not 0 < threshold < 1:
        raise UsageError(f"--threshold {threshold}: must be in (0, 1)")
    device = resolve_device(device)
    checkpoint = load_checkpoint(_pick_checkpoint(model_path, fold), device=device)
    model = checkpoint.model
    try:
        resolve_layer(model, layer)
    except Exception as error:  # noqa: BLE001 - the message already names the layer
        raise UsageError(f"--layer {layer}: {error}") from None
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    threshold = checkpoint.threshold if threshold is None else threshold
    size = checkpoint.config.train.image_size
    items = collect_inputs(inputs, masks)
    if not items:
        raise UsageError("no input images found")
    out.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    panels: dict[str, Path] = {}
    skipped: list[str] = []
    columns = (TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress, SegmentationGradCAM(model, layer, method) as cam:
        task = progress.add_task("explain", total=len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            loaded: list[tuple[_Item, np.ndarray, np.ndarray | None]] = []
            for item in chunk:
                try:
                    image = read_image(item.image)
                except ImageReadError as error:
                    _warn(f"{error}; skipped")
                    skipped.append(str(item.image))
                    progress.advance(task)
                    continue
                truth = None
                if item.mask is not None:
                    try:
                        truth = read_mask(item.mask)
                    except ImageReadError as error:
                        _warn(f"{error}; {item.image.name} explained without ground truth")
                    if truth is not None and truth.shape != image.shape[:2]:
                        _warn(
                            f"{item.mask}: mask size {truth.shape[::-1]} differs from image "
                            f"{image.shape[1::-1]}; no ground truth used"
                        )
                        truth = None
                loaded.append((item, image, truth))
            if not loaded:
                continue
            batch = prepare_batch([image for _, image, _ in loaded], size, device)
            with autocast_for(device):
                heatmaps, logits = cam(batch, MaskedLogitSum(threshold), return_logits=True)  # type: ignore[misc]
            gt_small = np.stack(
                [resize_mask(t, size) if t is not None else np.zeros((size, size), bool) for _, _, t in loaded]
            )
            scored = score_explanations(
                model, batch, heatmaps, logits, gt_small, threshold, topk, deletion_steps, max(batch_size, 2 * deletion_steps)
            )
            probs = torch.sigmoid(logits[:, 0]).cpu()
            for (item, image, truth), heatmap, prob, record in zip(loaded, heatmaps.cpu(), probs, scored):
                heat_full, prob_full = to_original_size(heatmap, prob, image.shape[:2])
                prediction = prob_full >= threshold
                row: dict[str, Any] = {
                    "stem": item.stem,
                    "image": str(item.image),
                    "has_ground_truth": truth is not None,
                    "predicted_area": float(prediction.mean()),
                    "dice": float("nan"),
                    "iou": float("nan"),
                    **record,
                }
                if truth is not None:
                    pred_t, truth_t = torch.from_numpy(prediction), torch.from_numpy(truth)
                    row["dice"] = float(dice_score(pred_t, truth_t)[0])
                    row["iou"] = float(iou_score(pred_t, truth_t)[0])
                _write_heatmap(out / item.stem, heat_full, heatmap_format)
                title = f"{item.stem}" + (f"  Dice {row['dice']:.3f}" if truth is not None else "")
                png = render_panel(image, heat_full, prediction, truth, title=title)
                panel_path = out / f"{item.stem}_panel.png"
                atomic_write(panel_path, lambda tmp, data=png: tmp.write_bytes(data))
                panels[item.stem] = panel_path
                records.append(row)
                progress.advance(task)

    report = explanation_report(records, keys=("dice", "iou", *METRIC_KEYS[1:]))
    _write_csv(out / "metrics.csv", records)
    summary = {
        "checkpoint": str(checkpoint.path),
        "explained": len(records),
        "skipped": skipped,
        "mean_std": report["mean_std"],
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
        },
    }
    atomic_write_json(out / "summary.json", summary)
    if gallery and records:
        notes = [f"checkpoint {checkpoint.path}; layer {layer}; method {method}; threshold {threshold:g}"]
        if skipped:
            notes.append(f"{len(skipped)} unreadable file(s) skipped: " + ", ".join(Path(s).name for s in skipped))
        write_gallery(out / "gallery.html", records, panels, summary=report["mean_std"], notes=notes)
    _print_summary(summary, out)
    return summary


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['explained']} image(s) explained", show_edge=False)
    for name in ("metric", "mean", "std", "n"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for name, stats in summary["mean_std"].items():
        table.add_row(name, f"{stats['mean']:.3f}", f"{stats['std']:.3f}", str(stats["n"]))
    console.print(table)
    if summary["skipped"]:
        console.print(f"{len(summary['skipped'])} file(s) skipped (named above)")
    console.print(f"outputs in {out}")


def register(app: typer.Typer) -> None:
    @app.command("explain")
    def explain(
        inputs: list[Path] = typer.Argument(
            ..., help="Image files, image folders, or dataset roots (images/ + masks/: ground truth used)."
        ),
        model: Path = typer.Option(..., "--model", "-m", help="Checkpoint (NAME.safetensors + NAME.json) or CV run folder."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
        masks: Path | None = typer.Option(None, "--masks", help="Folder of ground-truth masks matched by file stem."),
        layer: str = typer.Option(
            "decoder.final", "--layer", help="decoder.final, decoder.blockK, encoder.stageK, bottleneck, or a module path."
        ),
        method: str = typer.Option("gradcam", "--method", help="gradcam (paper), gradcam++, hirescam, layercam or scorecam (one extra forward pass per channel of --layer)."),
        threshold: float | None = typer.Option(None, "--threshold", help="Mask threshold (default: the checkpoint's)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        batch_size: int = typer.Option(8, "--batch-size", help="Images per forward/backward pass."),
        heatmap_format: str = typer.Option("npy", "--heatmap-format", help="npy (float32) or png16 (16-bit PNG, 65535 = 1)."),
        gallery: bool = typer.Option(True, "--gallery/--no-gallery", help="Write gallery.html (best, median, worst by Dice)."),
        fold: int | None = typer.Option(None, "--fold", help="Fold of a CV run folder (default: 0)."),
        topk: float = typer.Option(0.15, "--topk", help="Share of most salient pixels for top-k IoU."),
        deletion_steps: int = typer.Option(16, "--deletion-steps", help="Steps of the deletion/insertion curves (0 skips them)."),
    ) -> None:
        """Grad-CAM heatmaps with panels, metrics.csv and an HTML gallery."""
        run_explain(
            model, inputs, out, masks, layer, method, threshold, device, batch_size,
            heatmap_format, gallery, fold, topk, deletion_steps,
        )  # fmt: skip
