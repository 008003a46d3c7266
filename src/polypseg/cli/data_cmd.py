"""``polypseg data check|download|cache``."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import typer

from polypseg.cli.common import console

SHOWN_PER_KIND = 10


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Check, download and preprocess datasets.", no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(data_app, name="data")

    @data_app.command("check")
    def check(
        root: Path = typer.Argument(..., help="Dataset folder (images/ + masks/, or Original/ + 'Ground Truth/')."),
        show_all: bool = typer.Option(
            False, "--all", help=f"List every problem (default: the first {SHOWN_PER_KIND} of each kind)."
        ),
    ) -> None:
        """Decode every pair and report counts, sizes and problems; exit code 1 if there are errors (no pairs at all is one)."""
        from rich.markup import escape

        from polypseg.core.io_utils import display_name
        from polypseg.data.check import check_dataset

        report = check_dataset(root, progress=True)
        console.print(f"{display_name(root)}: {report.pairs} pairs", soft_wrap=True)
        if report.min_size:
            console.print(
                f"sizes: {report.distinct_sizes} distinct, smallest {report.min_size[1]}x{report.min_size[0]}, "
                f"largest {report.max_size[1]}x{report.max_size[0]} (width x height)",
                highlight=False,
            )
        by_kind: dict[tuple[str, str], list[str]] = defaultdict(list)
        for problem in report.problems:
            by_kind[(problem.severity, problem.kind)].append(problem.message)
        for (severity, kind), messages in sorted(by_kind.items()):
            colour = "red" if severity == "error" else "yellow"
            console.print(f"[{colour}]{severity}[/]: {len(messages)} {kind}", highlight=False, markup=True)
            for message in messages if show_all else messages[:SHOWN_PER_KIND]:
                console.print(f"  {escape(display_name(message))}", highlight=False, soft_wrap=True)
            if not show_all and len(messages) > SHOWN_PER_KIND:
                console.print(f"  ... and {len(messages) - SHOWN_PER_KIND} more (--all lists them)")
        console.print(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
        if not report.ok:
            raise typer.Exit(1)

    @data_app.command("download")
    def download(
        name: str = typer.Argument(..., help="Dataset name: kvasir-seg."),
        to: Path = typer.Option(..., "--to", help="Parent folder; the dataset lands in TO/NAME."),
        url: str | None = typer.Option(
            None, "--url", help="Override the official URL (e.g. a local mirror or file://...)."
        ),
    ) -> None:
        """Download, verify (per-file SHA-256 manifest shipped with polypseg) and unpack a dataset. Safe to rerun."""
        from polypseg.data.download import download_dataset

        path = download_dataset(name, to, url=url)
        console.print(f"{name} ready at {path}", highlight=False)

    @data_app.command("cache")
    def cache(
        root: Path = typer.Argument(..., help="Dataset folder."),
        size: int = typer.Option(256, "--size", min=16, help="Square size the images are resized to."),
        cache_dir: Path | None = typer.Option(
            None, "--cache-dir", help="Cache folder (default $POLYPSEG_CACHE or ~/.cache/polypseg)."
        ),
        out: Path | None = typer.Option(
            None,
            "--out",
            help="Also copy the cache to this .npz file; pass it as --data to train without the raw images (e.g. on a GPU machine).",
        ),
    ) -> None:
        """Build the preprocessed cache (JPEG-packed images, bit-packed masks) ahead of training."""
        import shutil

        from polypseg.core.io_utils import atomic_write
        from polypseg.data.cache import build_cache, cache_path
        from polypseg.data.inputs import check_output_path

        if out is not None and out.suffix != ".npz":  # before the build, which can take minutes
            raise typer.BadParameter("must end in .npz", param_hint="--out")
        if out is not None:
            check_output_path(out, "--out")
        if cache_dir is not None:
            check_output_path(cache_dir, "--cache-dir", folder=True)
        data = build_cache(root, size, cache_dir=cache_dir)
        path = cache_path(root, size, cache_dir=cache_dir)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            source = path
            atomic_write(out, lambda tmp: shutil.copyfile(source, tmp))  # never a truncated .npz under its name
            path = out
        console.print(
            f"{len(data.stems)} pairs at {size}px cached in {path} ({path.stat().st_size / 1e6:.1f} MB)",
            highlight=False,
        )
