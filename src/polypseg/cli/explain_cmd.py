"""``polypseg explain``: Grad-CAM panels, raw heatmaps, measured explanation quality and a gallery."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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
    stem: str  # output name: unique, and safe for any file system
    image: Path
    mask: Path | None = None
    mask_source: str = ""  # how the mask was found: "dataset", "layout", "--masks"


def _warn(message: str) -> None:
    from rich.markup import escape

    from polypseg.io_utils import display_name

    console.print(f"[yellow]warning:[/] {escape(display_name(message))}", highlight=False, soft_wrap=True)


def _say(message: str) -> None:
    from polypseg.io_utils import display_name

    console.print(display_name(message), highlight=False, soft_wrap=True, markup=False)


def _is_image(path: Path) -> bool:
    from polypseg.data import IMAGE_EXTENSIONS

    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _sibling_masks(images_dir: Path) -> Path | None:
    """The masks folder beside an images folder in a known dataset layout (``images/`` + ``masks/``)."""
    from polypseg.data import LAYOUTS

    for images_name, masks_name in LAYOUTS:
        if images_dir.name == images_name and (images_dir.parent / masks_name).is_dir():
            return images_dir.parent / masks_name
    return None


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    from polypseg.inputs import list_folder

    members, _ = list_folder(folder)
    return {p.stem: p for p in members if _is_image(p) and p.is_file()}


def collect_inputs(inputs: list[Path], masks: Path | None, skips: Any = None) -> list[_Item]:
    """Image files, image folders and dataset roots (``images/`` + ``masks/``) -> items with optional masks.

    Ground truth comes from, in order: the dataset root's pairs; ``--masks`` (matched by stem); the
    dataset layout around an image file or ``images/`` folder given directly (``DIR/images/x.jpg``
    takes ``DIR/masks/x.*``). Inputs that cannot be used are skipped and named (:mod:`polypseg.inputs`).
    """
    from polypseg.data import DataError, find_layout, index_dataset
    from polypseg.inputs import (
        BROKEN_LINK,
        EMPTY_FOLDER,
        LINK_LOOP,
        NOT_IMAGE,
        NOT_REGULAR,
        InputProblem,
        SkipLog,
        list_folder,
        path_problem,
        unique_names,
    )
    from polypseg.io_utils import display_name

    log = skips if skips is not None else SkipLog(_warn)
    items: list[_Item] = []
    for path in inputs:
        problem = path_problem(path)
        if problem is not None:
            log.skip(path, problem)
            continue
        if not path.is_dir():
            if _is_image(path):
                items.append(_Item(path.stem, path))
            else:
                log.skip(path, InputProblem(NOT_IMAGE, f"{display_name(path)}: not an image file (by extension)"))
            continue
        try:
            find_layout(path)
        except DataError:
            members, problems = list_folder(path)
            for item in problems:
                log.skip(path, item)
            found = []
            for member in members:
                if not _is_image(member):
                    continue
                trouble = path_problem(member)
                if trouble is not None:
                    log.skip(member, trouble)
                elif member.is_dir():
                    log.skip(member, InputProblem(NOT_REGULAR, f"{display_name(member)}: a folder named like an image file"))
                else:
                    found.append(member)
            if not found and not problems:
                log.skip(path, InputProblem(EMPTY_FOLDER, f"{display_name(path)}: no image files in this folder"))
            items += [_Item(p.stem, p) for p in found]
            continue
        index = index_dataset(path)
        images_dir = find_layout(path)[0]
        for rejected, reason in index.rejected:
            cause = BROKEN_LINK if "broken symlink" in reason else LINK_LOOP if "loop" in reason else NOT_IMAGE if "format" in reason else NOT_REGULAR
            if rejected.parent == images_dir:
                log.skip(rejected, InputProblem(cause, f"{display_name(rejected)}: {reason}"))
            else:
                _warn(f"{rejected}: {reason}; its image is explained without ground truth")
        items += [_Item(s.stem, s.image, s.mask, "dataset") for s in index.samples]
        items += [_Item(p.stem, p) for p in index.unpaired_images]
    if masks is not None:
        if not masks.is_dir():
            raise UsageError(f"--masks {display_name(masks)}: not a folder")
        by_stem = _masks_by_stem(masks)
        for item in items:
            if item.mask is None:
                item.mask = by_stem.get(item.stem)
                item.mask_source = "--masks" if item.mask is not None else ""
                if item.mask is None:
                    _warn(f"{item.image}: no mask named '{item.stem}.*' in {masks}; no ground truth for it")
    else:
        layouts: dict[Path, dict[str, Path]] = {}
        for item in items:
            if item.mask is None:
                sibling = _sibling_masks(item.image.parent)
                if sibling is not None:
                    table = layouts.setdefault(sibling, _masks_by_stem(sibling))
                    item.mask = table.get(item.stem)
                    item.mask_source = "layout" if item.mask is not None else ""
        for sibling in layouts:
            used = sum(1 for item in items if item.mask_source == "layout" and item.mask is not None and item.mask.parent == sibling)
            if used:
                _say(f"ground truth for {used} image(s) found by the dataset layout in {sibling} (images/ + masks/, same stem)")
    # output files are named by stem: distinct (x, x-2, ...; metrics.csv maps each to its image)
    for item, name in zip(items, unique_names(item.stem for item in items)):
        item.stem = name
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


def _model_note(model: Path, checkpoint: Path, fold: int | None) -> tuple[str, int | None]:
    """Which model explains the images, in words, and its fold (None for a lone checkpoint)."""
    from polypseg.checkpoint import find_checkpoints

    name = checkpoint.parent.name
    index = int(name[5:]) if name.startswith("fold_") and name[5:].isdigit() else None
    folds = len(find_checkpoints(model)) if model.is_dir() else 1
    if index is None:
        return f"explained with the model {checkpoint}", None
    if folds > 1:
        how = "chosen with --fold" if fold is not None else "the default; --fold K picks another"
        return f"explained with fold {index}'s model ({checkpoint}; {how}; Grad-CAM explains one model, not the {folds}-fold ensemble)", index
    return f"explained with fold {index}'s model ({checkpoint})", index


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


# Heatmaps are written at the image's size up to this many pixels, above it scaled down to fit
# (keeping the aspect ratio): a Grad-CAM map made at the model's 256 px carries no finer detail.
MAX_HEATMAP_PIXELS = 4_000_000
PANEL_SIDE = 1024  # panels are drawn from copies at most this long on their longer side


def _fit(shape: tuple[int, int], max_pixels: int | None = None, max_side: int | None = None) -> tuple[int, int]:
    height, width = shape
    scale = 1.0
    if max_pixels is not None and height * width > max_pixels:
        scale = min(scale, (max_pixels / (height * width)) ** 0.5)
    if max_side is not None and max(height, width) > max_side:
        scale = min(scale, max_side / max(height, width))
    return (max(1, round(height * scale)), max(1, round(width * scale))) if scale < 1 else (height, width)


def _heatmap_at(heatmap: Any, size: tuple[int, int]) -> np.ndarray:
    """A model-size heatmap at ``size`` (bilinear), renormalised so its maximum stays 1."""
    import torch.nn.functional as F

    from polypseg.explain import normalize_heatmaps

    values = heatmap.float()
    if tuple(values.shape[-2:]) != tuple(size):
        values = F.interpolate(values[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return normalize_heatmaps(values.clamp(0, 1)[None])[0].numpy().astype(np.float32, copy=False)


def run_explain(
    model_path: Path | None,
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
    precision: str = "auto",
) -> dict[str, Any]:
    """The command's body (also usable from Python); returns the summary written to ``summary.json``.

    ``model_path`` None is the shipped model (:mod:`polypseg.pretrained`); no ``inputs`` is the
    bundled Kvasir-SEG sample (40 of the test images the shipped model never saw, with masks).

    Bad inputs follow :mod:`polypseg.inputs` (skip, name the cause, count them at the end). The
    model works at its own resolution; full-size maps are made only for what is written and
    measured, piece by piece (heatmaps at most :data:`MAX_HEATMAP_PIXELS`, panels drawn from
    copies at most :data:`PANEL_SIDE` px long).
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from polypseg.checkpoint import load_checkpoint
    from polypseg.cli.common import resolve_device
    from polypseg.data import ImageReadError, read_image, read_mask, resize_image, resize_mask
    from polypseg.explain import METHODS, GradCAMDriver, MaskedLogitSum, resolve_layer
    from polypseg.explain_metrics import METRIC_KEYS, METRIC_SCALES, explanation_report, score_explanations
    from polypseg.gallery import render_panel, write_gallery
    from polypseg.inference import upsample_mask
    from polypseg.inputs import UNREADABLE, InputProblem, SkipLog, check_pixels, one_line_warnings, prepare_output_folder
    from polypseg.io_utils import atomic_write, atomic_write_json, display_name
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
    if out.exists() and not out.is_dir():
        prepare_output_folder(out)  # one line naming --out, before any work
    from polypseg.precision import check_precision, use_channels_last
    from polypseg.pretrained import resolve_model

    check_precision(precision, "--precision")
    model_path = resolve_model(model_path)
    if not inputs:
        from polypseg.sample_data import sample_dataset_path

        inputs = [sample_dataset_path()]
    skips = SkipLog(_warn)
    with one_line_warnings(_warn):
        device = resolve_device(device)
        checkpoint_path = _pick_checkpoint(model_path, fold)
        checkpoint = load_checkpoint(checkpoint_path, device=device)
        model = checkpoint.model
        try:
            resolve_layer(model, layer)
        except Exception as error:  # noqa: BLE001 - the message already names the layer
            raise UsageError(f"--layer {layer}: {error}") from None
        if use_channels_last(device, precision):
            model = model.to(memory_format=torch.channels_last)
        threshold = checkpoint.threshold if threshold is None else threshold
        size = checkpoint.config.train.image_size
        items = collect_inputs(inputs, masks, skips)
        if not items:
            named = "; ".join(detail for _, _, detail in skips.entries) or "no inputs"
            raise UsageError(f"no input images to explain ({named})")
        prepare_output_folder(out)
        model_note, model_fold = _model_note(model_path, checkpoint_path, fold)
        _say(model_note)

        records: list[dict[str, Any]] = []
        panels: dict[str, Path] = {}
        columns = (TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        driver = GradCAMDriver(model, layer, method, image_size=size, device=device, precision=precision, batch_size=batch_size)
        with Progress(*columns, console=console, transient=True) as progress, driver:
            task = progress.add_task("explain", total=len(items))
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                loaded: list[tuple[_Item, np.ndarray, np.ndarray | None]] = []
                for item in chunk:
                    try:
                        check_pixels(item.image)
                        image = read_image(item.image)
                    except InputProblem as problem:
                        skips.skip(item.image, problem)
                        progress.advance(task)
                        continue
                    except ImageReadError as error:
                        skips.skip(item.image, InputProblem(UNREADABLE, str(error)))
                        progress.advance(task)
                        continue
                    truth = None
                    if item.mask is not None:
                        try:
                            check_pixels(item.mask)
                            truth = read_mask(item.mask)
                        except (ImageReadError, InputProblem) as error:
                            _warn(f"{error}; {display_name(item.image.name)} explained without ground truth")
                        if truth is not None and truth.shape != image.shape[:2]:
                            _warn(
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
                    model, batch, heatmaps, logits, gt_small, threshold, topk, deletion_steps, max(batch_size, 2 * deletion_steps)
                )
                probs = torch.sigmoid(logits[:, 0]).float().cpu().numpy()
                for (item, image, truth), heatmap, prob, record in zip(loaded, heatmaps.cpu(), probs, scored):
                    shape = image.shape[:2]
                    prediction, _ = upsample_mask(prob, shape, threshold)
                    row: dict[str, Any] = {
                        "stem": item.stem,
                        "image": display_name(item.image),
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
                    _write_heatmap(out / item.stem, _heatmap_at(heatmap, _fit(shape, MAX_HEATMAP_PIXELS)), heatmap_format)
                    shown = _fit(shape, max_side=PANEL_SIDE)
                    small_image = image if shown == shape else resize_image(image, shown)
                    small_truth = None if truth is None else (truth if shown == shape else resize_mask(truth, shown))
                    small_prediction, _ = upsample_mask(prob, shown, threshold)
                    title = f"{item.stem}" + (f"  Dice {row['dice']:.3f}" if truth is not None else "")
                    png = render_panel(small_image, _heatmap_at(heatmap, shown), small_prediction, small_truth, title=title)
                    panel_path = out / f"{item.stem}_panel.png"
                    atomic_write(panel_path, lambda tmp, data=png: tmp.write_bytes(data))
                    panels[item.stem] = panel_path
                    records.append(row)
                    progress.advance(task)
                del loaded, batch

        report = explanation_report(records, keys=("dice", "iou", *METRIC_KEYS[1:]))
        _write_csv(out / "metrics.csv", records)
        with_truth = sum(1 for r in records if r["has_ground_truth"])
        summary = {
            "checkpoint": str(checkpoint.path),
            "model": model_note,
            "fold": model_fold,
            "explained": len(records),
            "with_ground_truth": with_truth,
            "skipped": skips.names,
            "skipped_causes": [{"file": name, "cause": cause, "reason": detail} for name, cause, detail in skips.entries],
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
                notes.append(f"{len(skips)} input(s) skipped ({skips.counts()}): " + ", ".join(Path(s).name for s in skips.names))
            notes += [f"{name}: {text}" for name, text in METRIC_SCALES.items() if name in report["mean_std"]]
            write_gallery(out / "gallery.html", records, panels, summary=report["mean_std"], notes=notes)
        _print_summary(summary, out, skips, with_truth)
    return summary


def _print_summary(summary: dict[str, Any], out: Path, skips: Any, with_truth: int) -> None:
    from rich.table import Table

    from polypseg.io_utils import display_name

    table = Table(title=f"{summary['explained']} image(s) explained", show_edge=False)
    for name in ("metric", "mean", "std", "n"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for name, stats in summary["mean_std"].items():
        shown = [f"{stats[k]:.3f}" if stats["n"] and math.isfinite(stats[k]) else "–" for k in ("mean", "std")]
        table.add_row(name, *shown, str(stats["n"]))
    console.print(table)
    if summary["explained"] and with_truth < summary["explained"]:
        missing = summary["explained"] - with_truth
        _say(
            f"{missing} image(s) had no ground truth, so dice, iou, energy_inside, pointing_game and topk_iou are "
            "empty for them: pass --masks DIR (masks named like the images), or give the dataset root (images/ + masks/)"
        )
    _say(
        "deletion_auc / insertion_auc: area under the model's confidence in its own mask, relative to the whole image's "
        "(1 = unchanged), as the most salient pixels are removed / revealed; lower deletion and higher insertion are "
        "better; insertion can exceed 1 when a partly revealed image scores higher than the whole one"
    )
    _say(summary["model"])
    done = f"{summary['explained']} image(s) explained"
    dice = summary["mean_std"].get("dice", {})
    if with_truth and dice.get("n") and math.isfinite(dice.get("mean", float("nan"))):
        done += f", mean Dice {dice['mean']:.3f} on the {with_truth} with ground truth"
    gallery = out / "gallery.html"
    if gallery.is_file():
        done += f"; gallery {display_name(gallery)}"
    _say(skips.closing(done, out))


def register(app: typer.Typer) -> None:
    @app.command("explain")
    def explain(
        inputs: Optional[list[Path]] = typer.Argument(
            None,
            help="Image files, image folders, or dataset roots (images/ + masks/: ground truth used). "
            "Default: the bundled 40-image Kvasir-SEG sample (with masks).",
        ),
        model: Optional[Path] = typer.Option(
            None,
            "--model",
            "-m",
            help="Checkpoint (NAME.safetensors + NAME.json), CV run folder, or a shipped model's name. Default: the shipped model (polypseg models).",
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
        masks: Path | None = typer.Option(
            None,
            "--masks",
            help="Folder of ground-truth masks matched by file stem (default: the masks/ beside an images/ folder, when there).",
        ),
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
        precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16."),
    ) -> None:
        """Grad-CAM heatmaps with panels, metrics.csv and an HTML gallery.

        Every input that cannot be used (missing, unreadable, not an image, over 40 megapixels, ...)
        is named with its cause, listed in skipped.csv and skipped; the last line counts them.
        Exit code: 0 if at least one image was explained, 1 if none could be, 2 for a usage error.
        """
        summary = run_explain(
            model, inputs or [], out, masks, layer, method, threshold, device, batch_size,
            heatmap_format, gallery, fold, topk, deletion_steps, precision,
        )  # fmt: skip
        if summary["explained"] == 0:
            console.print("[bold red]error:[/] no image could be explained (see the warnings above)", highlight=False)
            raise typer.Exit(1)

    @app.command("bench-explain")
    def bench_explain(
        model: Optional[Path] = typer.Option(
            None, "--model", "-m", help="Checkpoint, CV run folder (fold 0), a shipped model's name, or 'random'. Default: the shipped model."
        ),
        data: Optional[Path] = typer.Option(
            None, "--data", help="Images to explain, cycled to --images (default: the bundled sample; random pixels with --model random)."
        ),
        images: int = typer.Option(1000, "--images", min=1, help="Heatmaps to compute per precision."),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per forward/backward pass."),
        precisions: str = typer.Option("fp32,bf16", "--precisions", help="Comma-separated: fp32, bf16, auto."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON."),
        markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table on stdout."),
    ) -> None:
        """Grad-CAM speed per precision (heatmaps/s, speed-up over fp32) and each precision's heatmap correlation with fp32."""
        from polypseg.bench import benchmark_gradcam, gradcam_markdown
        from polypseg.cli.common import resolve_device
        from polypseg.io_utils import atomic_write_json
        from polypseg.precision import check_precision

        chosen = tuple(p.strip() for p in precisions.split(",") if p.strip())
        for p in chosen:
            check_precision(p, "--precisions")
        if str(model) == "random":
            from polypseg.models import create_model

            net, size, pixels = create_model().eval(), 256, None
        else:
            from polypseg.checkpoint import load_checkpoint
            from polypseg.data import build_cache
            from polypseg.pretrained import resolve_model
            from polypseg.sample_data import sample_dataset_path

            checkpoint = load_checkpoint(_pick_checkpoint(resolve_model(model), None))
            net, size = checkpoint.model, checkpoint.config.train.image_size
            pixels = build_cache(data or sample_dataset_path(), size, progress=False).images
        with console.status(f"timing {images} Grad-CAM heatmaps per precision ({', '.join(chosen)})"):
            rows = benchmark_gradcam(net, n=images, batch_size=batch_size, device=resolve_device(device), precisions=chosen, image_size=size, images=pixels)
        for row in rows:
            corr = row["heatmap_correlation"]
            console.print(
                f"{row['precision']}: {row['n']} heatmaps in {row['seconds']:.1f} s = {row['heatmaps_per_s']:.1f}/s"
                + (f", {row['speedup_vs_fp32']:.2f}x fp32" if "speedup_vs_fp32" in row else "")
                + (f", correlation with fp32 {corr:.4f} over {row['images_compared']} images" if corr is not None else ""),
                highlight=False,
            )
        console.print(f"on {rows[0]['device_name']} {rows[0]['cpu_flags']}".rstrip(), highlight=False)
        if json_path is not None:
            atomic_write_json(json_path, rows)
        if markdown:
            print(gradcam_markdown(rows))
