"""Explain image files into a folder: Grad-CAM heatmaps, panels, metrics.csv, summary.json and a gallery.

What ``polypseg explain`` does, for Python callers too: :func:`explain_files`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from polypseg.core.rules import check_threshold
from polypseg.core.runs import parse_fold_name
from polypseg.errors import PolypsegError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from polypseg.data.inputs import InputFile, SkipLog
    from polypseg.explain.engine_gradcam import EngineGradCAMDriver
    from polypseg.explain.gradcam import GradCAMDriver
    from polypseg.models.checkpoint import Checkpoint

    Driver = GradCAMDriver | EngineGradCAMDriver

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


@dataclass(frozen=True)
class _Options:
    """The explain options as given: ``threshold`` None (the run's or checkpoint's, as predict resolves it)
    and ``device`` ``auto`` are resolved when the model loads."""

    layer: str
    method: str
    threshold: float | None
    device: str
    batch_size: int
    heatmap_format: str
    topk: float
    deletion_steps: int
    precision: str
    engine: str

    def check(self, out: Path) -> None:
        """Every option value checked before any work, each error a line naming its command-line option."""
        from polypseg.core.precision import check_precision
        from polypseg.data.inputs import prepare_output_folder
        from polypseg.explain.engine_gradcam import ENGINES
        from polypseg.explain.gradcam import METHODS
        from polypseg.inference.loading import engine_precision_problem

        if self.heatmap_format not in HEATMAP_FORMATS:
            raise PolypsegError(f"--heatmap-format {self.heatmap_format}: use one of {', '.join(HEATMAP_FORMATS)}")
        if self.method not in METHODS:
            raise PolypsegError(f"--method {self.method}: use one of {', '.join(METHODS)}")
        if self.batch_size < 1:
            raise PolypsegError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.deletion_steps < 0:
            raise PolypsegError(f"--deletion-steps {self.deletion_steps}: must be >= 0 (0 skips deletion/insertion)")
        if not 0 < self.topk <= 1:
            raise PolypsegError(f"--topk {self.topk}: must be in (0, 1]")
        if self.threshold is not None:
            check_threshold(self.threshold, "--threshold")
        if out.exists() and not out.is_dir():
            prepare_output_folder(out)  # one line naming --out
        check_precision(self.precision, "--precision")
        engines = ("torch", *ENGINES)
        if self.engine not in engines:
            raise PolypsegError(f"--engine {self.engine}: choose one of {', '.join(engines)}")
        problem = engine_precision_problem(self.engine, self.precision)
        if problem is not None:
            raise PolypsegError(
                f"--engine {self.engine} --precision {self.precision}: {problem}; use --engine openvino or torch"
            )
        if self.engine != "torch" and (self.method != "gradcam" or self.layer != "decoder.final"):
            raise PolypsegError(
                f"--engine {self.engine} computes the paper's Grad-CAM (--method gradcam --layer decoder.final) only"
            )


@dataclass(frozen=True)
class _Run:
    """One explain run: where its outputs go, the model that explains and its input size, and the
    options with threshold and device resolved."""

    out: Path
    net: nn.Module
    image_size: int
    options: _Options
    heatmap_precision: str  # what the heatmaps are computed in (``options.precision`` resolved for the engine)
    metrics_precision: str  # what torch scores the explanations in


@dataclass
class _Loaded:
    """An input read for explaining: its pixels and, where a usable mask came with it, its ground truth."""

    item: InputFile
    image: np.ndarray
    truth: np.ndarray | None


def explain_files(
    inputs: Sequence[Path],
    out: Path,
    *,
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
    from polypseg.data.inputs import SkipLog, collect_inputs, one_line_warnings, prepare_output_folder
    from polypseg.explain.metrics import METRIC_KEYS, explanation_report
    from polypseg.models.pretrained import resolve_model

    options = _Options(
        layer=layer,
        method=method,
        threshold=threshold,
        device=device,
        batch_size=batch_size,
        heatmap_format=heatmap_format,
        topk=topk,
        deletion_steps=deletion_steps,
        precision=precision,
        engine=engine,
    )
    options.check(out)
    model_path = resolve_model(model)
    if not inputs:
        from polypseg.data.sample_data import sample_dataset_path

        inputs = [sample_dataset_path()]
    skips = SkipLog(warn)
    with one_line_warnings(warn):
        run, checkpoint_path, checkpoint = _load_run(out, model_path, options, fold=fold)
        items = collect_inputs(inputs, skips, ground_truth=True, masks=masks, notify=say, exclude=out)
        if not items:
            named = "; ".join(detail for _, _, detail in skips.entries) or "no inputs"
            raise PolypsegError(f"no input images to explain ({named})")
        prepare_output_folder(out)
        model_note, model_fold = _say_model(model_path, checkpoint_path, checkpoint, fold, say)
        with _gradcam_driver(run, checkpoint_path) as driver:
            records, panels = _explain_items(run, driver, items, skips, warn=warn, progress=progress)
        report = explanation_report(records, keys=("dice", "iou", *METRIC_KEYS[1:]))
        summary = _summary(run, checkpoint.path, model_note, model_fold, records=records, skips=skips, report=report)
        _write_tables(out, records, summary, skips)
        if gallery and records:
            _write_gallery(run, model_note, records=records, panels=panels, skips=skips, report=report)
        else:
            (out / "gallery.html").unlink(missing_ok=True)  # as for the tables: no earlier run's page
    return summary


def _say_model(
    model_path: Path, checkpoint_path: Path, checkpoint: Checkpoint, fold: int | None, say: Callable[[str], None]
) -> tuple[str, int | None]:
    """Say which model explains (and that explain has no flip TTA where the model was evaluated with
    it); returns the model note and the fold explained."""
    from polypseg.inference.loading import flip_tta_note

    model_note, model_fold = _model_note(model_path, checkpoint_path, fold)
    say(model_note)
    tta_note = flip_tta_note(checkpoint.config.to_dict(), "explain")
    if tta_note:
        say(tta_note)
    return model_note, model_fold


def _load_run(out: Path, model_path: Path, options: _Options, *, fold: int | None) -> tuple[_Run, Path, Checkpoint]:
    """The run (device and threshold resolved), the checkpoint file that explains and the loaded checkpoint,
    its layer checked."""
    from polypseg.core.devices import resolve_device
    from polypseg.core.precision import resolve_precision
    from polypseg.explain.engine_gradcam import resolve_engine_precision as engine_precision
    from polypseg.explain.gradcam import resolve_layer
    from polypseg.inference.inferer import use_precision_layout
    from polypseg.inference.loading import resolve_source
    from polypseg.models.checkpoint import load_checkpoint, pick_checkpoint

    device = str(resolve_device(options.device, label="--device"))
    if options.engine != "torch" and device != "cpu":
        raise PolypsegError(f"--engine {options.engine} runs on the CPU; pass --device cpu or --engine torch")
    checkpoint_path = pick_checkpoint(model_path, fold)
    checkpoint = load_checkpoint(checkpoint_path, device=device)
    try:
        resolve_layer(checkpoint.model, options.layer)
    except Exception as error:  # noqa: BLE001 - the message already names the layer
        raise PolypsegError(f"--layer {options.layer}: {error}") from None
    use_precision_layout(checkpoint.model, device, options.precision)
    threshold = resolve_source(checkpoint_path, threshold=options.threshold).threshold  # predict's rule
    resolved = replace(options, device=device, threshold=threshold)
    torch_precision = resolve_precision(options.precision, device)  # the metrics are scored in torch
    heatmap_precision = (
        torch_precision if options.engine == "torch" else engine_precision(options.engine, options.precision)
    )
    run = _Run(
        out=out,
        net=checkpoint.model,
        image_size=checkpoint.config.train.image_size,
        options=resolved,
        heatmap_precision=heatmap_precision,
        metrics_precision=torch_precision,
    )
    return run, checkpoint_path, checkpoint


def _gradcam_driver(run: _Run, checkpoint_path: Path) -> Driver:
    """The heatmap maker for ``run.options.engine``: torch's Grad-CAM driver, or a forward-only CPU engine's."""
    if run.options.engine == "torch":
        from polypseg.explain.gradcam import GradCAMDriver

        return GradCAMDriver(
            run.net,
            run.options.layer,
            run.options.method,
            image_size=run.image_size,
            device=run.options.device,
            precision=run.options.precision,
            batch_size=run.options.batch_size,
        )
    from polypseg.explain.engine_gradcam import EngineGradCAMDriver

    return EngineGradCAMDriver(
        run.net,
        checkpoint_path,
        run.options.engine,
        precision=run.options.precision,
        image_size=run.image_size,
        layer=run.options.layer,
    )


def _explain_items(
    run: _Run,
    driver: Driver,
    items: Sequence[InputFile],
    skips: SkipLog,
    *,
    warn: Callable[[str], None],
    progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Explain ``items`` batch by batch under a progress bar: one metrics row and one panel per image explained."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from polypseg.inference.inferer import batch_slices

    records: list[dict[str, Any]] = []
    panels: dict[str, Path] = {}
    columns = (TextColumn("explaining"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("explain", total=len(items))
        for chunk in batch_slices(len(items), run.options.batch_size):
            loaded = []
            for item in items[chunk]:
                read = _read_input(item, skips, warn)
                if read is None:
                    bar.advance(task)
                else:
                    loaded.append(read)
            if not loaded:
                continue
            for name, row, panel in _explain_batch(run, driver, loaded):
                records.append(row)
                panels[name] = panel
                bar.advance(task)
            del loaded
    return records, panels


def _read_input(item: InputFile, skips: SkipLog, warn: Callable[[str], None]) -> _Loaded | None:
    """The image and, where usable, its ground truth; None (the cause noted in ``skips``) for an unusable image.

    A mask that cannot be read, or whose size differs from the image's, is named through ``warn``
    and the image is explained without ground truth.
    """
    from polypseg.core.io_utils import display_name
    from polypseg.data.images import ImageReadError, read_image, read_mask
    from polypseg.data.inputs import UNREADABLE, InputProblem, check_pixels

    try:
        check_pixels(item.path)
        image = read_image(item.path)
    except InputProblem as problem:
        skips.skip(item.path, problem)
        return None
    except ImageReadError as error:
        skips.skip(item.path, InputProblem(UNREADABLE, str(error)))
        return None
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
    return _Loaded(item, image, truth)


def _explain_batch(run: _Run, driver: Driver, loaded: list[_Loaded]) -> Iterator[tuple[str, dict[str, Any], Path]]:
    """Heatmaps and explanation metrics for one batch at model resolution, then each image's outputs:
    ``(stem, metrics row, panel path)`` per image."""
    import torch

    from polypseg.data.images import resize_mask
    from polypseg.explain.gradcam import MaskedLogitSum, resize_heatmap
    from polypseg.explain.metrics import score_explanations

    size = run.image_size
    cams = driver.run([entry.image for entry in loaded], MaskedLogitSum(run.options.threshold))
    gt_small = np.stack(
        [resize_mask(e.truth, size) if e.truth is not None else np.zeros((size, size), bool) for e in loaded]
    )
    scored = score_explanations(
        run.net,
        cams.inputs,
        cams.heatmaps,
        cams.logits,
        gt_masks=gt_small,
        threshold=run.options.threshold,
        topk=run.options.topk,
        deletion_steps=run.options.deletion_steps,
        batch_size=run.options.batch_size,  # the memory bound of every pass, deletion/insertion included
        precision=run.options.precision,
        logits_from_model=run.options.engine == "torch",  # another engine's logits: torch rescores the original
    )
    probs = torch.sigmoid(cams.logits[:, 0]).float().cpu().numpy()
    for entry, heatmap, prob, record in zip(loaded, cams.heatmaps.cpu(), probs, scored, strict=False):
        row = _metrics_row(entry, prob, record, run.options.threshold)
        _write_heatmap(
            run.out / entry.item.name,
            resize_heatmap(heatmap, _fit(entry.image.shape[:2], MAX_HEATMAP_PIXELS)),
            run.options.heatmap_format,
        )
        yield entry.item.name, row, _write_panel(run, entry, heatmap, prob, row)


def _metrics_row(entry: _Loaded, prob: np.ndarray, record: dict[str, float], threshold: float) -> dict[str, Any]:
    """One ``metrics.csv`` row: the explanation metrics, plus the predicted area and, with ground truth,
    Dice and IoU, all measured on the mask at the image's own size."""
    import torch

    from polypseg.core.io_utils import display_name
    from polypseg.inference.masks import upsample_mask
    from polypseg.metrics.segmentation import dice_score, iou_score

    prediction, _ = upsample_mask(prob, entry.image.shape[:2], threshold)
    row: dict[str, Any] = {
        "stem": entry.item.name,
        "image": display_name(entry.item.path),
        "has_ground_truth": entry.truth is not None,
        "predicted_area": float(np.count_nonzero(prediction)) / max(prediction.size, 1),
        "dice": float("nan"),
        "iou": float("nan"),
        **record,
    }
    if entry.truth is not None:
        pred_t, truth_t = torch.from_numpy(prediction), torch.from_numpy(entry.truth)
        row["dice"] = float(dice_score(pred_t, truth_t)[0])
        row["iou"] = float(iou_score(pred_t, truth_t)[0])
    return row


def _write_panel(run: _Run, entry: _Loaded, heatmap: torch.Tensor, prob: np.ndarray, row: dict[str, Any]) -> Path:
    """``<stem>_panel.png``: image, heatmap, prediction and ground truth, drawn at most :data:`PANEL_SIDE` px long."""
    from polypseg.core.io_utils import atomic_write
    from polypseg.data.images import resize_image, resize_mask
    from polypseg.explain.gallery import render_panel
    from polypseg.explain.gradcam import resize_heatmap
    from polypseg.inference.masks import upsample_mask

    image, truth, name = entry.image, entry.truth, entry.item.name
    shape = image.shape[:2]
    shown = _fit(shape, max_side=PANEL_SIDE)
    small_image = image if shown == shape else resize_image(image, shown)
    small_truth = None if truth is None else (truth if shown == shape else resize_mask(truth, shown))
    small_prediction, _ = upsample_mask(prob, shown, run.options.threshold)
    title = f"{name}" + (f"  Dice {row['dice']:.3f}" if truth is not None else "")
    png = render_panel(small_image, resize_heatmap(heatmap, shown), small_prediction, small_truth, title=title)
    panel_path = run.out / f"{name}_panel.png"
    atomic_write(panel_path, lambda tmp: tmp.write_bytes(png))
    return panel_path


def _summary(
    run: _Run,
    checkpoint: Path,
    model_note: str,
    model_fold: int | None,
    *,
    records: list[dict[str, Any]],
    skips: SkipLog,
    report: dict[str, Any],
) -> dict[str, Any]:
    """What ``summary.json`` holds: the model, counts, skipped inputs, metric means and the run's settings."""
    from polypseg.explain.metrics import METRIC_SCALES

    return {
        "checkpoint": str(checkpoint),
        "model": model_note,
        "fold": model_fold,
        "explained": len(records),
        "with_ground_truth": sum(1 for r in records if r["has_ground_truth"]),
        "skipped": skips.names,
        "skipped_causes": [{"file": name, "cause": cause, "reason": detail} for name, cause, detail in skips.entries],
        "mean_std": report["mean_std"],
        "metric_scales": METRIC_SCALES,
        "settings": {
            "layer": run.options.layer,
            "method": run.options.method,
            "threshold": run.options.threshold,
            "image_size": run.image_size,
            "topk": run.options.topk,
            "deletion_steps": run.options.deletion_steps,
            "deletion_baseline": "mean",
            "insertion_baseline": "blur",
            "device": run.options.device,
            "engine": run.options.engine,
            "precision": run.heatmap_precision,
            "metrics_precision": run.metrics_precision,
            "heatmap_max_pixels": MAX_HEATMAP_PIXELS,
        },
    }


def _write_tables(out: Path, records: list[dict[str, Any]], summary: dict[str, Any], skips: SkipLog) -> None:
    """``metrics.csv``, ``summary.json`` and, when inputs were skipped, ``skipped.csv`` (else none there)."""
    from polypseg.core.io_utils import atomic_write_json
    from polypseg.data.inputs import write_csv

    write_csv(
        out / "metrics.csv",
        CSV_COLUMNS,
        [{k: _csv_value(r.get(k, float("nan"))) for k in CSV_COLUMNS} for r in records],
    )
    atomic_write_json(out / "summary.json", summary)
    skips.write_csv(out / "skipped.csv")  # with none skipped, an earlier run's list goes


def _write_gallery(
    run: _Run,
    model_note: str,
    *,
    records: list[dict[str, Any]],
    panels: dict[str, Path],
    skips: SkipLog,
    report: dict[str, Any],
) -> None:
    """``gallery.html``: the panels with the metric means and notes on the model, the skipped inputs and each metric."""
    from polypseg.explain.gallery import write_gallery
    from polypseg.explain.metrics import METRIC_SCALES

    notes = [
        f"{model_note}; layer {run.options.layer}; method {run.options.method}; threshold {run.options.threshold:g}"
    ]
    if skips:
        notes.append(
            f"{len(skips)} input(s) skipped ({skips.counts()}): " + ", ".join(Path(s).name for s in skips.names)
        )
    notes += [f"{name}: {text}" for name, text in METRIC_SCALES.items() if name in report["mean_std"]]
    write_gallery(run.out / "gallery.html", records, panels, summary=report["mean_std"], notes=notes)


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
