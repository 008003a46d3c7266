"""``polypseg predict``, ``polypseg export`` and ``polypseg bench``."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional

import numpy as np
import typer

from polypseg.cli.common import UsageError, console, fail
from polypseg.errors import PolypsegError

PREDICTION_COLUMNS = ("file", "width", "height", "area_pixels", "area_fraction", "mean_confidence", "threshold")
VIDEO_COLUMNS = (
    "file",
    "frames",
    "fps",
    "seconds",
    "consistency",
    "consistency_smoothed",
    "alpha",
    "overlay",
    "frames_csv",
    "warning",
)


def _warn(message: str) -> None:
    from rich.markup import escape

    from polypseg.io_utils import display_name

    console.print(f"[yellow]warning:[/] {escape(display_name(message))}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    """``fail`` for messages that name files: shown as text (``fail`` escapes markup), whatever bytes they hold."""
    from polypseg.io_utils import display_name

    fail(display_name(message), code=code)


def _say(message: str) -> None:
    from polypseg.io_utils import display_name

    console.print(display_name(message), highlight=False, soft_wrap=True, markup=False)


@dataclass
class _Input:
    path: Path
    name: str  # output file stem, unique within the run and safe for any file system
    video: bool


def collect_inputs(inputs: list[Path], recursive: bool = False, skips: Any = None) -> tuple[list[_Input], list[tuple[str, str]]]:
    """Files and folders -> image and video inputs with unique output names, plus ``(path, reason)`` skips.

    Every input that cannot be used is named with its cause (see :mod:`polypseg.inputs`); with
    ``skips`` (a :class:`polypseg.inputs.SkipLog`) they are reported there as they are found.
    """
    from polypseg.data import IMAGE_EXTENSIONS
    from polypseg.inputs import (
        EMPTY_FOLDER,
        NOT_IMAGE,
        NOT_REGULAR,
        InputProblem,
        SkipLog,
        list_folder,
        path_problem,
        unique_names,
    )
    from polypseg.io_utils import display_name
    from polypseg.video import is_video

    log = skips if skips is not None else SkipLog(lambda message: None)
    before = len(log)

    def kind(path: Path) -> str | None:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return "image"
        return "video" if is_video(path) else None

    found: list[tuple[Path, bool]] = []
    for path in inputs:
        problem = path_problem(path)
        if problem is not None:
            log.skip(path, problem)
        elif path.is_dir():
            members, problems = list_folder(path, recursive)
            for item in problems:
                log.skip(path, item)
            usable = 0
            for member in members:
                if kind(member) is None:
                    continue  # other files (notes, sub-folders) are not inputs; --recursive enters folders
                trouble = path_problem(member)
                if trouble is not None:
                    log.skip(member, trouble)
                    continue
                if member.is_dir():
                    if not recursive:
                        log.skip(member, InputProblem(NOT_REGULAR, f"{display_name(member)}: a folder named like an image or video file"))
                    continue
                found.append((member, kind(member) == "video"))
                usable += 1
            if not usable and not problems:
                hint = "" if recursive else " (use --recursive for sub-folders)"
                log.skip(path, InputProblem(EMPTY_FOLDER, f"{display_name(path)}: no images or videos in this folder{hint}"))
        elif kind(path) is None:
            log.skip(path, InputProblem(NOT_IMAGE, f"{display_name(path)}: not an image or video file (by extension)"))
        else:
            found.append((path, kind(path) == "video"))
    names = unique_names(path.stem for path, _ in found)
    items = [_Input(path, name, video) for (path, video), name in zip(found, names)]
    skipped = [(name, detail) for name, _, detail in log.entries[before:]]
    return items, skipped


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    from polypseg.io_utils import atomic_write

    def write(tmp: Path) -> None:
        Image.fromarray(array).save(tmp, format="PNG")

    atomic_write(path, write)


def _write_csv(path: Path, columns: tuple[str, ...] | list[str], rows: list[dict[str, Any]]) -> None:
    from polypseg.io_utils import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _load_image(item: _Input) -> np.ndarray:
    """Decode one input after checking its header against :data:`polypseg.inputs.MAX_INPUT_PIXELS`."""
    from polypseg.data import ImageReadError, read_image
    from polypseg.inputs import UNREADABLE, InputProblem, check_pixels
    from polypseg.io_utils import display_name

    check_pixels(item.path)
    try:
        return read_image(item.path)
    except ImageReadError as error:
        raise InputProblem(UNREADABLE, display_name(str(error))) from None
    except MemoryError:
        raise InputProblem(UNREADABLE, f"{display_name(item.path)}: not enough memory to decode it") from None


def _predict_images(
    predictor: Any,
    images: list[_Input],
    out: Path,
    batch_size: int,
    overlays: bool,
    save_probabilities: bool,
    skipped: Any,
) -> list[dict[str, Any]]:
    """Write masks (and overlays, probabilities) of ``images``; unreadable ones go to ``skipped``.

    The model runs at its own resolution; each map is brought to the image's size in stripes
    (:func:`polypseg.inference.upsample_rows`) only to be written, and the overlay is drawn into the
    decoded image itself, so the peak memory per image stays near 8 bytes per pixel.
    """
    from rich.progress import track

    from polypseg.inference import overlay_mask_inplace, upsample_mask, upsample_uint8
    from polypseg.inputs import InputProblem
    from polypseg.io_utils import display_name

    rows: list[dict[str, Any]] = []
    for item in track(images, description=f"predicting {len(images)} image(s)", transient=True, console=console):
        try:
            image = _load_image(item)
            mean, std = predictor.predict_model_size([image])
        except InputProblem as problem:
            skipped.skip(item.path, problem)
            continue
        shape = image.shape[:2]
        mask, confidence = upsample_mask(mean[0], shape, predictor.threshold)
        area = int(np.count_nonzero(mask))
        _save_png(out / "masks" / f"{item.name}.png", _mask_png(mask))
        if save_probabilities:
            _save_png(out / "probabilities" / f"{item.name}.png", upsample_uint8(mean[0], shape))
        row = {
            "file": display_name(item.path),
            "width": shape[1],
            "height": shape[0],
            "area_pixels": area,
            "area_fraction": round(area / max(mask.size, 1), 6),
            "mean_confidence": round(confidence, 6),
            "threshold": predictor.threshold,
        }
        if std is not None:
            # a std of probabilities is at most 0.5: stored as round(std * 510) to use all 8 bits
            uncertainty = upsample_uint8(std[0], shape, scale=510.0)
            row["uncertainty_mean"] = round(float(uncertainty.mean(dtype=np.float64)) / 510.0, 6)
            if save_probabilities:
                _save_png(out / "uncertainty" / f"{item.name}.png", uncertainty)
            del uncertainty
        if overlays:
            if not image.flags.writeable:  # decoded arrays can be read-only views of PIL's buffer
                image = np.array(image)
            _save_png(out / "overlays" / f"{item.name}.png", overlay_mask_inplace(image, mask))
        del image, mask
        rows.append(row)
    return rows


def _mask_png(mask: np.ndarray) -> np.ndarray:
    out = mask.view(np.uint8)
    return out * np.uint8(255)


def run_predict(
    model: Path | None,
    inputs: list[Path],
    out: Path,
    threshold: float | None = None,
    tta: bool = False,
    backend: str = "auto",
    device: str = "auto",
    batch_size: int = 8,
    smooth: float | None = None,
    save_probabilities: bool = False,
    recursive: bool = False,
    fold: int | None = None,
    overlays: bool = True,
    cache_dir: Path | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Predict images and videos into ``out``; returns counts of done and skipped inputs.

    Bad inputs follow :mod:`polypseg.inputs`: each is skipped and named with its cause, the rest
    are predicted, and the closing line counts both.
    """
    from polypseg.inference import Predictor
    from polypseg.inputs import FAILED, SkipLog, one_line_warnings, prepare_output_folder
    from polypseg.video import VideoError, segment_video

    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    if smooth is not None and not 0 < smooth <= 1:
        raise UsageError(f"--smooth {smooth}: the EMA weight of the newest frame must be in (0, 1]")
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError(f"--threshold {threshold}: must be in [0, 1]")
    if out.exists() and not out.is_dir():
        prepare_output_folder(out)  # one line naming --out, before any work
    skips = SkipLog(_warn)
    with one_line_warnings(_warn):
        items, _ = collect_inputs(inputs, recursive, skips)
        if not items:
            raise UsageError("no images or videos to predict (see the warnings above)")

        predictor = Predictor.from_checkpoint(
            model,
            device=device,
            backend=backend,
            tta=tta,
            threshold=threshold,
            fold=fold,
            batch_size=batch_size,
            cache_dir=cache_dir,
            notify=_say,
            precision=precision,
        )
        _say(f"model: {predictor!r}")
        prepare_output_folder(out)

        images = [item for item in items if not item.video]
        rows = _predict_images(predictor, images, out, batch_size, overlays, save_probabilities, skips)
        if images:
            columns = list(PREDICTION_COLUMNS) + (["uncertainty_mean"] if predictor.n_models > 1 else [])
            _write_csv(out / "predictions.csv", columns, rows)

        video_rows: list[dict[str, Any]] = []
        for item in (item for item in items if item.video):
            try:
                result = segment_video(predictor, item.path, out, alpha=smooth, stem=item.name, write_overlay=overlays)
            except VideoError as error:
                skips.skip(item.path, str(error), cause=FAILED)
                continue
            if result.warning:
                _warn(result.warning)
            speed = result.frames / max(result.seconds, 1e-9)
            line = (
                f"{item.path}: {result.frames} frames in {result.seconds:.1f} s ({speed:.1f} frames/s), "
                f"consistency (mean IoU of consecutive masks) {result.consistency:.4f}"
            )
            if result.consistency_smoothed is not None:
                line += f" raw, {result.consistency_smoothed:.4f} with EMA smoothing (alpha {result.alpha:g})"
            _say(line)
            video_rows.append(
                {
                    "file": str(item.path),
                    "frames": result.frames,
                    "fps": round(result.fps, 3),
                    "seconds": round(result.seconds, 3),
                    "consistency": round(result.consistency, 6),
                    "consistency_smoothed": "" if result.consistency_smoothed is None else round(result.consistency_smoothed, 6),
                    "alpha": "" if result.alpha is None else result.alpha,
                    "overlay": result.overlay.name if result.overlay else "",
                    "frames_csv": result.frames_csv.name if result.frames_csv else "",
                    "warning": result.warning or "",
                }
            )
        if video_rows:
            _write_csv(out / "videos.csv", VIDEO_COLUMNS, [{k: _text(v) for k, v in row.items()} for row in video_rows])
        if skips:
            skips.write_csv(out / "skipped.csv")
    done = len(rows) + len(video_rows)
    _say(skips.closing(f"{len(rows)} image(s), {len(video_rows)} video(s) predicted", out))
    return {"images": len(rows), "videos": len(video_rows), "skipped": len(skips), "done": done}


def _text(value: Any) -> Any:
    from polypseg.io_utils import display_name

    return display_name(value) if isinstance(value, str) else value


def run_export(
    model: Path,
    fmt: str = "onnx",
    out: Path | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    int8: bool = False,
    calibration: Path | None = None,
    calibration_count: int = 64,
    validate: Path | None = None,
    validate_limit: int | None = None,
    verify_images: Path | None = None,
) -> list[dict[str, Any]]:
    """Export each checkpoint named by ``model`` (one, or every fold of a run); verify against PyTorch."""
    from polypseg.checkpoint import find_checkpoints
    from polypseg.export import (
        DEFAULT_OPSET,
        MAX_INT8_DICE_CHANGE,
        collect_images,
        export_onnx,
        int8_path_for,
        measure_dice_change,
        quantize_onnx_int8,
        record_dice_change,
        verify_onnx,
    )
    from polypseg.sample_data import sample_dataset_path

    if fmt != "onnx":
        raise UsageError(f"--format {fmt}: only 'onnx' is supported")
    if (calibration is not None or validate is not None) and not int8:
        raise UsageError("--calibration and --validate apply to --int8 only")
    checkpoints = find_checkpoints(model)
    if out is not None and len(checkpoints) > 1:
        raise UsageError(f"--out: {model} holds {len(checkpoints)} checkpoints; omit --out to write NAME.onnx beside each")
    real = collect_images(verify_images or calibration or sample_dataset_path())[:8]
    results = []
    for checkpoint in checkpoints:
        with console.status(f"exporting {checkpoint}"):
            onnx_path = export_onnx(checkpoint, out, opset=opset or DEFAULT_OPSET, dynamic_batch=dynamic_batch)
            diff_random = verify_onnx(checkpoint, onnx_path, random_images=4)
            diff_real = verify_onnx(checkpoint, onnx_path, images=real, random_images=0)
        console.print(
            f"{onnx_path}: max |p_onnx - p_torch| = {diff_random:.2e} on 4 random images, "
            f"{diff_real:.2e} on {len(real)} real images",
            highlight=False,
            soft_wrap=True,
        )
        result: dict[str, Any] = {
            "checkpoint": str(checkpoint),
            "onnx": str(onnx_path),
            "max_abs_diff_random": diff_random,
            "max_abs_diff_real": diff_real,
        }
        if int8:
            source = calibration or sample_dataset_path()
            if calibration is None:
                console.print(f"calibrating on the bundled sample ({source}); pass --calibration DIR with your own images")
            target = int8_path_for(checkpoint) if out is None else out.with_suffix(".int8.onnx")
            with console.status(f"quantizing {onnx_path} to int8"):
                int8_path = quantize_onnx_int8(onnx_path, target, source, max_images=calibration_count)
            console.print(
                f"{int8_path}: int8 (static QDQ, calibrated on up to {calibration_count} images)", highlight=False, soft_wrap=True
            )
            result["int8"] = str(int8_path)
            if validate is not None:
                change = measure_dice_change(onnx_path, int8_path, validate, limit=validate_limit)
                record_dice_change(int8_path, change)
                within = abs(change["dice_change"]) <= MAX_INT8_DICE_CHANGE
                if not within:
                    verdict = f"beyond {MAX_INT8_DICE_CHANGE}: fp32 stays the CPU default"
                elif out is None:
                    verdict = f"within {MAX_INT8_DICE_CHANGE}: int8 becomes the CPU default for this checkpoint"
                else:
                    verdict = f"within {MAX_INT8_DICE_CHANGE}"
                console.print(
                    f"Dice on {change['n']} images: fp32 {change['dice_reference']:.4f}, int8 {change['dice_candidate']:.4f}, "
                    f"change {change['dice_change']:+.4f} ({verdict})",
                    highlight=False,
                    soft_wrap=True,
                )
                result["dice"] = change
            else:
                console.print(
                    "not validated (no --validate DIR): predict keeps fp32 as the CPU default; pass the .onnx to use int8"
                )
        results.append(result)
    return results


def run_bench(
    model: str,
    batch_size: int = 1,
    backend: str = "auto",
    device: str = "auto",
    compile: str = "none",
    compare_eager: bool = False,
    repeats: int = 50,
    warmup: int = 10,
    image_size: int = 256,
    pipeline: str = "both",
    calibration: Path | None = None,
    json_path: Path | None = None,
    markdown: bool = False,
) -> list[dict[str, Any]]:
    """Benchmark one or several backends; prints a table, optionally writes JSON and markdown."""
    import tempfile

    from rich.table import Table

    from polypseg.bench import BACKENDS, PIPELINES, available_backends, benchmark, load_for_bench
    from polypseg.devices import resolve_device

    torch_device = resolve_device(device, label="--device")
    if backend == "auto":
        backends = ["torch" if torch_device.type == "cuda" else "onnxruntime"]
    elif backend == "all":
        backends = available_backends(torch_device)
    elif backend in BACKENDS:
        backends = [backend]
    else:
        raise UsageError(f"--backend {backend}: choose auto, all, {', '.join(BACKENDS)}")
    pipelines = list(PIPELINES) if pipeline == "both" else [pipeline]
    if pipeline != "both" and pipeline not in PIPELINES:
        raise UsageError(f"--pipeline {pipeline}: choose both, {', '.join(PIPELINES)}")
    compile_mode = None if compile in ("none", "eager") else compile
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="polypseg-bench-") as workdir:
        runs = []
        for name in backends:
            if name.startswith("torch"):
                if compile_mode is None or compare_eager:
                    runs.append((name, None))
                if compile_mode is not None:
                    runs.append((name, compile_mode))
            else:
                runs.append((name, None))
        for name, mode in runs:
            with console.status(f"loading {name}{' (' + mode + ')' if mode else ''}"):
                predictor = load_for_bench(
                    model,
                    name,
                    device=str(torch_device),
                    compile=mode,
                    image_size=image_size,
                    calibration=calibration,
                    workdir=workdir,
                )
            for pipe in pipelines:
                with console.status(f"timing {name} {mode or 'eager'} {pipe}, batch {batch_size}"):
                    row = benchmark(predictor, batch_size=batch_size, warmup=warmup, repeats=repeats, pipeline=pipe)
                row["backend"] = name
                rows.append(row)
    table = Table(
        title=f"{rows[0]['device_name']}, {rows[0]['image_size']}x{rows[0]['image_size']}, batch {batch_size}, median of {repeats}"
    )
    for column in ("backend", "precision", "mode", "pipeline"):
        table.add_column(column)
    for column in ("median ms", "p90 ms", "images/s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["backend"],
            row["precision"],
            row["mode"],
            row["pipeline"],
            f"{row['median_ms']:.2f}",
            f"{row['p90_ms']:.2f}",
            f"{row['images_per_s']:.1f}",
        )
    console.print(table)
    if json_path is not None:
        from polypseg.io_utils import atomic_write_json

        atomic_write_json(json_path, rows)
    if markdown:
        print(bench_markdown(rows))
    return rows


def bench_markdown(rows: list[dict[str, Any]]) -> str:
    """Benchmark rows as a markdown table (for docs/benchmarks.md)."""
    lines = [
        "| device | backend | precision | mode | pipeline | batch | median ms | p90 ms | images/s |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device_name']} | {r['backend']} | {r['precision']} | {r['mode']} | {r['pipeline']} | {r['batch_size']} | "
            f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['images_per_s']:.1f} |"
        )
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict(
        inputs: list[Path] = typer.Argument(..., help="Image files, folders of images/videos, and videos (mp4, avi, mov, mkv)."),
        model: Optional[Path] = typer.Option(
            None,
            "--model",
            "-m",
            help="Checkpoint, CV run folder (ensemble of its folds), exported .onnx, or a shipped model's name. "
            "Default: the shipped model (polypseg models).",
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
        threshold: float | None = typer.Option(None, "--threshold", help="Mask threshold (default: the run's or checkpoint's)."),
        tta: bool = typer.Option(False, "--tta", help="Average over horizontal and vertical flips."),
        backend: str = typer.Option(
            "auto",
            "--backend",
            help="auto (torch on CUDA, onnxruntime on CPU), torch, onnxruntime, or openvino (CPU; pip install 'polypseg[openvino]').",
        ),
        precision: str = typer.Option(
            "auto", "--precision", help="torch and openvino: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16."
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        batch_size: int = typer.Option(8, "--batch-size", help="Images (or video frames) per forward pass."),
        smooth: float | None = typer.Option(
            None, "--smooth", help="Videos: EMA weight of the newest frame's probabilities, in (0, 1); 1 = none."
        ),
        save_probabilities: bool = typer.Option(
            False,
            "--save-probabilities",
            help="Also write probabilities/ (PNG, round(p*255)) and, for ensembles, uncertainty/ (PNG, round(std*510)).",
        ),
        recursive: bool = typer.Option(False, "--recursive", "-r", help="Search folders recursively."),
        fold: int | None = typer.Option(None, "--fold", help="Use one fold of a CV run folder instead of the ensemble."),
        overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write overlay images and videos."),
        cache_dir: Path | None = typer.Option(
            None,
            "--cache-dir",
            help="Where ONNX exports for the CPU backend are kept (default $POLYPSEG_CACHE, $XDG_CACHE_HOME/polypseg or ~/.cache/polypseg); never the run folder.",
        ),
    ) -> None:
        """Segment images, folders and videos: masks/, overlays/, predictions.csv; videos: overlay MP4 + per-frame CSV.

        Every input that cannot be used (missing, unreadable, not an image, over 40 megapixels, ...)
        is named with its cause, listed in skipped.csv and skipped; the last line counts them.
        Exit code: 0 if at least one input was predicted, 1 if none could be, 2 for a usage error.
        """
        try:
            summary = run_predict(
                model,
                inputs,
                out,
                threshold,
                tta,
                backend,
                device,
                batch_size,
                smooth,
                save_probabilities,
                recursive,
                fold,
                overlays,
                cache_dir,
                precision,
            )
        except PolypsegError as error:
            _fail(str(error))
        if summary["done"] == 0:
            _fail("no input could be predicted (see the warnings above)", code=1)

    @app.command("export")
    def export(
        model: Path = typer.Option(..., "--model", "-m", help="Checkpoint, or a CV run folder (every fold is exported)."),
        fmt: str = typer.Option("onnx", "--format", help="Export format: onnx."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Output .onnx (default: NAME.onnx beside the checkpoint)."),
        opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default: 18)."),
        dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch", help="Dynamic batch axis."),
        int8: bool = typer.Option(False, "--int8", help="Also write a static int8 (QDQ) model, NAME.int8.onnx."),
        calibration: Path | None = typer.Option(
            None, "--calibration", help="int8: folder of calibration images (default: bundled sample)."
        ),
        calibration_count: int = typer.Option(64, "--calibration-count", help="int8: number of calibration images."),
        validate: Path | None = typer.Option(
            None, "--validate", help="int8: labelled dataset; measures the Dice change vs fp32 and records it."
        ),
        validate_limit: int | None = typer.Option(
            None, "--validate-limit", help="int8: use only the first N pairs of --validate."
        ),
        verify_images: Path | None = typer.Option(
            None, "--verify-images", help="Real images to compare with PyTorch (default: calibration or bundled sample)."
        ),
        json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON."),
    ) -> None:
        """Export to ONNX (sigmoid included, dynamic batch), verified against PyTorch; optionally int8."""
        try:
            results = run_export(
                model,
                fmt,
                out,
                opset,
                dynamic_batch,
                int8,
                calibration,
                calibration_count,
                validate,
                validate_limit,
                verify_images,
            )
        except PolypsegError as error:
            _fail(str(error))
        if json_path is not None:
            from polypseg.io_utils import atomic_write_json

            atomic_write_json(json_path, results)

    @app.command("bench")
    def bench(
        model: str = typer.Option(
            ..., "--model", "-m", help="Checkpoint, run folder, .onnx, or 'random' (untrained default architecture)."
        ),
        batch_size: int = typer.Option(1, "--batch-size", help="Images per forward pass."),
        backend: str = typer.Option(
            "auto",
            "--backend",
            help="auto, torch, torch-bf16, onnxruntime, onnxruntime-int8, openvino, openvino-bf16, openvino-int8 "
            "(OpenVINO: pip install 'polypseg[openvino]'), or all (every one installed; bf16 where the CPU has it).",
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        compile: str = typer.Option(
            "none", "--compile", help="torch: none, reduce-overhead (CUDA graphs), max-autotune or default."
        ),
        compare_eager: bool = typer.Option(
            False, "--compare-eager", help="With --compile: also time eager PyTorch in the same run."
        ),
        repeats: int = typer.Option(50, "--repeats", help="Timed repetitions (median reported)."),
        warmup: int = typer.Option(10, "--warmup", help="Untimed warm-up repetitions."),
        image_size: int = typer.Option(256, "--image-size", help="Input size for --model random."),
        pipeline: str = typer.Option("both", "--pipeline", help="model, end-to-end (from uint8 on the host), or both."),
        calibration: Path | None = typer.Option(
            None, "--calibration", help="onnxruntime-int8: calibration images (default: bundled sample)."
        ),
        json_path: Path | None = typer.Option(None, "--json", help="Write the rows as JSON."),
        markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table on stdout."),
    ) -> None:
        """Inference speed: warm-up, repeated timing, median latency and images/s, device named."""
        try:
            run_bench(
                model,
                batch_size,
                backend,
                device,
                compile,
                compare_eager,
                repeats,
                warmup,
                image_size,
                pipeline,
                calibration,
                json_path,
                markdown,
            )
        except PolypsegError as error:
            _fail(str(error))
