"""``polypseg explain`` and ``polypseg bench-explain``: options in, :func:`polypseg.explain.files.explain_files` and
:func:`polypseg.experiments.bench_explain.benchmark_gradcam` do the work, results printed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from polypseg.cli.common import UsageError, console, keep_freed_memory_on_cpu, say, warn, write_json
from polypseg.cli.options import ProgressOpt


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    from polypseg.core.io_utils import display_name
    from polypseg.data.inputs import SkipLog

    with_truth = summary["with_ground_truth"]
    skips = SkipLog(warn, [(c["file"], c["cause"], c["reason"]) for c in summary["skipped_causes"]])
    if not summary["explained"]:  # no table of empty metrics: the closing line, then the error
        say(skips.closing("0 image(s) explained", out))
        return

    table = Table(title=f"{summary['explained']} image(s) explained", show_edge=False)
    for name in ("metric", "mean", "std", "n"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for name, stats in summary["mean_std"].items():
        shown = [f"{stats[k]:.3f}" if stats["n"] and math.isfinite(stats[k]) else "–" for k in ("mean", "std")]
        table.add_row(name, *shown, str(stats["n"]))
    console.print(table)
    if summary["explained"] and with_truth < summary["explained"]:
        missing = summary["explained"] - with_truth
        say(
            f"{missing} image(s) had no ground truth, so dice, iou, energy_inside, pointing_game and topk_iou are "
            "empty for them: pass --masks DIR (masks named like the images), or give the dataset root (images/ + masks/)"
        )
    say(
        "deletion_auc / insertion_auc: area under the model's confidence in its own mask, relative to the whole image's "
        "(1 = unchanged), as the most salient pixels are removed / revealed; lower deletion and higher insertion are "
        "better; insertion can exceed 1 when a partly revealed image scores higher than the whole one"
    )
    say(summary["model"])
    done = f"{summary['explained']} image(s) explained"
    dice = summary["mean_std"].get("dice", {})
    if with_truth and dice.get("n") and math.isfinite(dice.get("mean", float("nan"))):
        done += f", mean Dice {dice['mean']:.3f} on the {with_truth} with ground truth"
    gallery = out / "gallery.html"
    if gallery.is_file():
        done += f"; gallery {display_name(gallery)}"
    say(skips.closing(done, out))


def register(app: typer.Typer) -> None:
    @app.command("explain")
    def explain(
        inputs: list[Path] | None = typer.Argument(
            None,
            help="Image files, image folders, or dataset roots (images/ + masks/: ground truth used). "
            "Default: the bundled 40-image Kvasir-SEG sample (with masks).",
        ),
        model: Path | None = typer.Option(
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
            "decoder.final",
            "--layer",
            help="decoder.final, decoder.blockK, encoder.stageK, bottleneck, or a module path.",
        ),
        method: str = typer.Option(
            "gradcam",
            "--method",
            help="gradcam (paper), gradcam++, hirescam, layercam or scorecam (one extra forward pass per channel of --layer).",
        ),
        threshold: float | None = typer.Option(
            None, "--threshold", help="Mask threshold, 0 < t < 1 (default: the run's or checkpoint's, as predict uses)."
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        batch_size: int = typer.Option(
            8, "--batch-size", help="Images per pass: Grad-CAM's forward/backward and the deletion/insertion forwards."
        ),
        heatmap_format: str = typer.Option(
            "npy", "--heatmap-format", help="npy (float32) or png16 (16-bit PNG, 65535 = 1)."
        ),
        gallery: bool = typer.Option(
            True,
            "--gallery/--no-gallery",
            help="Write gallery.html (best, median, worst by Dice); --no-gallery removes one an earlier run left in --out.",
        ),
        fold: int | None = typer.Option(None, "--fold", help="Fold of a CV run folder (default: 0)."),
        topk: float = typer.Option(0.15, "--topk", help="Share of most salient pixels for top-k IoU."),
        deletion_steps: int = typer.Option(
            16, "--deletion-steps", help="Steps of the deletion/insertion curves (0 skips them)."
        ),
        precision: str = typer.Option(
            "auto", "--precision", help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16."
        ),
        engine: str = typer.Option(
            "torch",
            "--engine",
            help="torch, or a forward-only CPU engine for the paper's Grad-CAM: openvino (bf16 where the CPU "
            "has it; 2.5x torch fp32 on 2 cores) or onnxruntime. Same heatmaps: the head's gradient is exact.",
        ),
        progress: bool = ProgressOpt,
    ) -> None:
        """Grad-CAM heatmaps with panels, metrics.csv and an HTML gallery.

        Every input that cannot be used (missing, unreadable, not an image, over 40 megapixels, ...)
        is named with its cause, listed in skipped.csv and skipped; the last line counts them.
        Exit code: 0 if at least one image was explained, 1 if none could be, 2 for a usage error.

        Example: polypseg explain data/kvasir-seg --out gradcam (a dataset root: its masks give Dice and IoU)
        """
        from polypseg.explain.files import explain_files

        keep_freed_memory_on_cpu(device)
        summary = explain_files(
            inputs or [],
            out,
            model=model,
            masks=masks,
            layer=layer,
            method=method,
            threshold=threshold,
            device=device,
            batch_size=batch_size,
            heatmap_format=heatmap_format,
            gallery=gallery,
            fold=fold,
            topk=topk,
            deletion_steps=deletion_steps,
            precision=precision,
            engine=engine,
            progress=progress,
            warn=warn,
            say=say,
        )
        _print_summary(summary, out)
        if summary["explained"] == 0:
            console.print(
                "[bold red]error:[/] no image could be explained (see the warnings above)", highlight=False, markup=True
            )
            raise typer.Exit(1)

    @app.command("bench-explain")
    def bench_explain(
        model: Path | None = typer.Option(
            None,
            "--model",
            "-m",
            help="Checkpoint, CV run folder (fold 0), a shipped model's name, or 'random'. Default: the shipped model.",
        ),
        data: Path | None = typer.Option(
            None,
            "--data",
            help="Images to explain, cycled to --images (default: the bundled sample; random pixels with --model random).",
        ),
        images: int = typer.Option(1000, "--images", min=1, help="Heatmaps to compute per precision."),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per forward/backward pass."),
        precisions: str = typer.Option("fp32,bf16", "--precisions", help="Comma-separated: fp32, bf16, auto."),
        engines: str = typer.Option(
            "",
            "--engines",
            help="Also time forward-only Grad-CAM on CPU engines, comma-separated: onnxruntime, onnxruntime-int8, "
            "openvino, openvino-bf16, openvino-int8 (exact for the paper's layer: the head is linear).",
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        json_path: Path | None = typer.Option(None, "--json", help="Write the rows as JSON."),
        markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table on stdout."),
    ) -> None:
        """Grad-CAM speed per precision (heatmaps/s, speed-up over fp32) and each precision's heatmap correlation with fp32."""
        from polypseg.cli.common import resolve_device
        from polypseg.core.precision import check_precision
        from polypseg.data.inputs import check_output_path
        from polypseg.experiments.bench_explain import benchmark_gradcam, gradcam_markdown

        if json_path is not None:
            check_output_path(json_path, "--json")

        chosen = tuple(p.strip() for p in precisions.split(",") if p.strip())
        for p in chosen:
            check_precision(p, "--precisions")
        engine_specs = tuple(e.strip() for e in engines.split(",") if e.strip())
        known = ("onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16", "openvino-int8")
        for spec in engine_specs:
            if spec not in known:
                raise UsageError(f"--engines {spec}: choose from {', '.join(known)}")
        if str(model) == "random":
            from polypseg.models.factory import create_model

            net, size, pixels = create_model().eval(), 256, None
        else:
            from polypseg.data.cache import build_cache
            from polypseg.data.sample_data import sample_dataset_path
            from polypseg.models.checkpoint import load_checkpoint, pick_checkpoint
            from polypseg.models.pretrained import resolve_model

            checkpoint = load_checkpoint(pick_checkpoint(resolve_model(model), None))
            net, size = checkpoint.model, checkpoint.config.train.image_size
            pixels = build_cache(data or sample_dataset_path(), size, progress=False).images
        keep_freed_memory_on_cpu(device)
        with console.status(f"timing {images} Grad-CAM heatmaps per setting ({', '.join(chosen + engine_specs)})"):
            rows = benchmark_gradcam(
                net,
                n=images,
                batch_size=batch_size,
                device=resolve_device(device),
                precisions=chosen,
                image_size=size,
                images=pixels,
                engines=engine_specs,
            )
        for row in rows:
            corr = row["heatmap_correlation"]
            console.print(
                f"{row['engine']} {row['precision']}: {row['n']} heatmaps in {row['seconds']:.1f} s = {row['heatmaps_per_s']:.1f}/s"
                + (f", {row['speedup_vs_fp32']:.2f}x fp32" if "speedup_vs_fp32" in row else "")
                + (
                    f", correlation with fp32 {corr:.4f} over {row['images_compared']} images"
                    if corr is not None
                    else ""
                ),
                highlight=False,
                soft_wrap=True,
            )
        console.print(f"on {rows[0]['device_name']} {rows[0]['cpu_flags']}".rstrip(), highlight=False, soft_wrap=True)
        if json_path is not None:
            write_json(json_path, rows, "--json")
        if markdown:
            print(gradcam_markdown(rows))
