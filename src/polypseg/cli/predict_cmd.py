"""``polypseg predict``, ``polypseg export`` and ``polypseg bench``: options in, one library call
(:func:`polypseg.inference.predict_files.predict_files`, :func:`polypseg.inference.deploy.export_checkpoints`,
:func:`polypseg.experiments.bench.benchmark_backends`), results printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import typer

from polypseg.cli.common import console, fail, say, warn, write_json
from polypseg.errors import PolypsegError


def _fail(message: str, code: int = 2) -> NoReturn:
    """``fail`` for messages that name files: shown as text (``fail`` escapes markup), whatever bytes they hold."""
    from polypseg.core.io_utils import display_name

    fail(display_name(message), code=code)


# The oldest opset an export can be converted to (the exporter writes 18; 16 and older lack
# adapters for its operators, and the conversion then fails quietly, keeping 18).
MIN_OPSET = 17


def _check_opset(opset: int | None) -> None:
    """``--opset`` between :data:`MIN_OPSET` and the newest the installed onnx knows, or a one-line error."""
    if opset is None:
        return
    try:
        from onnx.defs import onnx_opset_version

        newest = onnx_opset_version()
    except ImportError:  # the export itself says what is missing
        return
    if not MIN_OPSET <= opset <= newest:
        _fail(f"--opset {opset}: choose {MIN_OPSET} to {newest} (the newest this onnx knows)")


def _check_at_least(values: dict[str, int | None], minimum: int) -> None:
    """A one-line error naming the first option (``{"--repeats": 0}``) whose value is below ``minimum``."""
    for option, value in values.items():
        if value is not None and value < minimum:
            _fail(f"{option} {value}: must be >= {minimum}")


def _print_bench(rows: list[dict[str, Any]], batch_size: int, repeats: int) -> None:
    from rich.table import Table

    table = Table(
        title=f"{rows[0]['device_name']}, {rows[0]['image_size']}x{rows[0]['image_size']}, batch {batch_size}, median of {repeats}"
    )
    for column in ("backend", "precision", "mode", "pipeline"):
        table.add_column(column, overflow="fold")  # full backend names, even on an 80-column pipe
    paired = all("speedup_vs_first" in row for row in rows)
    for column in ("p10 ms", "median ms", "p90 ms", "images/s") + (
        (f"vs {rows[0]['first_backend']}",) if paired else ()
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["backend"],
            row["precision"],
            row["mode"],
            row["pipeline"],
            f"{row['p10_ms']:.2f}",
            f"{row['median_ms']:.2f}",
            f"{row['p90_ms']:.2f}",
            f"{row['images_per_s']:.1f}",
            *((f"{row['speedup_vs_first']:.2f}x",) if paired else ()),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict(
        inputs: list[Path] = typer.Argument(
            ..., help="Image files, folders of images/videos, and videos (mp4, avi, mov, mkv)."
        ),
        model: Path | None = typer.Option(
            None,
            "--model",
            "-m",
            help="Checkpoint, CV run folder (ensemble of its folds), exported .onnx, or a shipped model's name. "
            "Default: the shipped model (polypseg models).",
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
        threshold: float | None = typer.Option(
            None, "--threshold", help="Mask threshold, 0 < t < 1 (default: the run's or checkpoint's)."
        ),
        tta: bool = typer.Option(False, "--tta", help="Average over horizontal and vertical flips."),
        backend: str = typer.Option(
            "auto",
            "--backend",
            help="auto (torch on CUDA; on CPU OpenVINO if installed, else onnxruntime, and with --precision auto the "
            "checkpoint's validated int8 model where polypseg export --int8 --validate made one), torch, onnxruntime, "
            "or openvino (CPU; pip install 'polypseg[openvino]'). An explicit backend never picks int8 itself: "
            "pass the NAME.int8.onnx file as --model to run one.",
        ),
        precision: str = typer.Option(
            "auto",
            "--precision",
            help="torch and openvino: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16; "
            "onnxruntime computes in fp32 (bf16 there is refused). With --backend auto on CPU, auto also takes a "
            "validated int8 model where there is one; fp32 and bf16 never do.",
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
        fold: int | None = typer.Option(
            None, "--fold", help="Use one fold of a CV run folder instead of the ensemble."
        ),
        overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write overlay images and videos."),
        cache_dir: Path | None = typer.Option(
            None,
            "--cache-dir",
            help="Where ONNX exports for the CPU backend are kept (default $POLYPSEG_CACHE, $XDG_CACHE_HOME/polypseg or ~/.cache/polypseg); never the run folder.",
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        """Segment images, folders and videos: masks/, overlays/, predictions.csv; videos: overlay MP4 + per-frame CSV.

        Every input that cannot be used (missing, unreadable, not an image, over 40 megapixels, ...)
        is named with its cause, listed in skipped.csv and skipped; the last line counts them.
        Exit code: 0 if at least one input was predicted, 1 if none could be, 2 for a usage error.

        Example: polypseg predict scans/ clip.mp4 --out predictions
        """
        try:
            from polypseg.inference.predict_files import predict_files

            summary = predict_files(
                inputs,
                out,
                model=model,
                threshold=threshold,
                tta=tta,
                backend=backend,
                device=device,
                batch_size=batch_size,
                smooth=smooth,
                save_probabilities=save_probabilities,
                recursive=recursive,
                fold=fold,
                overlays=overlays,
                cache_dir=cache_dir,
                precision=precision,
                warn=warn,
                say=say,
                progress=progress,
            )
        except PolypsegError as error:
            _fail(str(error))
        if summary.done == 0:
            _fail("no input could be predicted (see the warnings above)", code=1)

    @app.command("export")
    def export(
        model: Path = typer.Option(
            ...,
            "--model",
            "-m",
            help="Checkpoint, a CV run folder (every fold is exported), or a shipped model's name (with --out).",
        ),
        fmt: str = typer.Option("onnx", "--format", help="Export format: onnx."),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Output .onnx (default: NAME.onnx beside the checkpoint)."
        ),
        opset: int | None = typer.Option(
            None, "--opset", help=f"ONNX opset, {MIN_OPSET} to the newest the installed onnx knows (default: 18)."
        ),
        dynamic_batch: bool = typer.Option(
            True,
            "--dynamic-batch/--static-batch",
            help="--static-batch: a fixed batch of 1, for engines that need one (prediction then keeps its own export with a batch axis).",
        ),
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
            None,
            "--verify-images",
            help="Real images to compare with PyTorch (default: calibration or bundled sample).",
        ),
        json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON."),
    ) -> None:
        """Export to ONNX (sigmoid included, dynamic batch), verified against PyTorch; optionally int8.

        Example: polypseg export --model kvasir-unet-r34 --out model.onnx --int8
        """
        from polypseg.data.inputs import check_output_path

        _check_opset(opset)
        _check_at_least({"--calibration-count": calibration_count, "--validate-limit": validate_limit}, 1)
        try:
            for option, path in (("--out", out), ("--json", json_path)):
                if path is not None:
                    check_output_path(path, option)
            from polypseg.inference.deploy import export_checkpoints

            with console.status("exporting") as status:
                results = export_checkpoints(
                    model,
                    fmt=fmt,
                    out=out,
                    opset=opset,
                    dynamic_batch=dynamic_batch,
                    int8=int8,
                    calibration=calibration,
                    calibration_count=calibration_count,
                    validate=validate,
                    validate_limit=validate_limit,
                    verify_images=verify_images,
                    say=lambda message: console.print(message, highlight=False, soft_wrap=True),
                    step=status.update,
                )
        except PolypsegError as error:
            _fail(str(error))
        if json_path is not None:
            write_json(json_path, results, "--json")

    @app.command("bench")
    def bench(
        model: str = typer.Option(
            ...,
            "--model",
            "-m",
            help="Checkpoint, run folder, .onnx, a shipped model's name (polypseg models), or 'random' (untrained default architecture).",
        ),
        batch_size: int = typer.Option(1, "--batch-size", help="Images per forward pass."),
        backend: str = typer.Option(
            "auto",
            "--backend",
            help="auto (what predict uses: torch on CUDA; on CPU OpenVINO if installed, else onnxruntime, in int8 where validated, else bf16 where native), torch, torch-bf16, onnxruntime, onnxruntime-int8, openvino, openvino-bf16, openvino-int8 "
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
        rounds: int = typer.Option(
            1,
            "--rounds",
            help="Split --repeats into this many rounds that visit every backend in turn (all loaded at once), "
            "with speed-ups paired per round: for CPUs whose speed drifts.",
        ),
        image_size: int = typer.Option(256, "--image-size", help="Input size for --model random."),
        pipeline: str = typer.Option("both", "--pipeline", help="model, end-to-end (from uint8 on the host), or both."),
        calibration: Path | None = typer.Option(
            None, "--calibration", help="onnxruntime-int8: calibration images (default: bundled sample)."
        ),
        json_path: Path | None = typer.Option(None, "--json", help="Write the rows as JSON."),
        markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table on stdout."),
    ) -> None:
        """Inference speed: warm-up, repeated timing, median latency and images/s, device named.

        Example: polypseg bench --model kvasir-unet-r34 --backend all --batch-size 8
        """
        from polypseg.data.inputs import check_output_path

        _check_at_least({"--batch-size": batch_size, "--repeats": repeats, "--rounds": rounds}, 1)
        _check_at_least({"--warmup": warmup}, 0)
        _check_at_least({"--image-size": image_size}, 32)  # the encoder halves it 5 times
        try:
            if json_path is not None:
                check_output_path(json_path, "--json")
            from polypseg.experiments.bench import bench_markdown, benchmark_backends

            with console.status("benchmarking") as status:
                rows = benchmark_backends(
                    model,
                    batch_size=batch_size,
                    backend=backend,
                    device=device,
                    compile=compile,
                    compare_eager=compare_eager,
                    repeats=repeats,
                    warmup=warmup,
                    image_size=image_size,
                    pipeline=pipeline,
                    calibration=calibration,
                    step=status.update,
                    rounds=rounds,
                    say=lambda message: console.print(message, highlight=False, soft_wrap=True),
                )
        except PolypsegError as error:
            _fail(str(error))
        _print_bench(rows, batch_size, repeats)
        if json_path is not None:
            write_json(json_path, rows, "--json")
        if markdown:
            print(bench_markdown(rows))
