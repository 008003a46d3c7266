"""``polypseg report | compare | evaluate`` and ``polypseg study skip-ablation | encoder-init | pranet | external``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from polypseg.cli.common import UsageError, console, keep_freed_memory_on_cpu
from polypseg.cli.options import (
    DATA_HELP,
    CacheOpt,
    DeviceOpt,
    EpochsOpt,
    FoldExplainOpt,
    ProgressOpt,
    RecipeChoices,
    SeedOpt,
    SetOpt,
    SizeOpt,
    StudyRecipeOpt,
    WeightsOpt,
    data_or_sample,
)
from polypseg.core.config import RunConfig

METRIC_ALIASES = {"bf1": "boundary_f1", "boundary-f1": "boundary_f1", "sens": "sensitivity", "prec": "precision"}

StudyFoldsOpt = typer.Option(
    None, "--folds", min=2, help="Number of folds (default 5, or the study's own with --resume)."
)
ResumeOpt = typer.Option(
    False, "--resume", help="Continue an interrupted study in --out (finished runs and folds are kept)."
)


def _resumed_study(run_dir: Path, resume: bool) -> tuple[str | RunConfig, int | None, int | None]:
    """What a study's options build on: with ``--resume``, the config, seed and folds its first
    run was started with (so resuming needs no options); otherwise the ``paper`` recipe."""
    from polypseg.core.runs import RunDir

    saved = RunDir(run_dir).saved_settings() if resume else None
    if saved is None:
        return "paper", None, None
    return saved.config, saved.seed, saved.folds


def _metrics(names: list[str]) -> list[str]:
    from polypseg.reporting.compare import COMPARE_METRICS

    resolved = [METRIC_ALIASES.get(n.lower(), n.lower()) for n in names]
    for name, value in zip(names, resolved, strict=False):
        if value not in COMPARE_METRICS:
            raise UsageError(f"--metric {name}: choose one of {', '.join(COMPARE_METRICS)}")
    return resolved


def _evaluate(
    model: Path,
    data: Path,
    *,
    out: Path | None,
    device: str,
    cache_dir: Path | None,
    progress: bool,
    tta: bool | None = None,
) -> None:
    from polypseg.cli.common import resolve_device
    from polypseg.experiments.external import evaluate_external
    from polypseg.models.pretrained import resolve_model

    resolved = resolve_model(str(model))
    if resolved != model and out is None:  # a shipped model: never write into the installed package
        out = Path(f"evaluate-{model}")
    result = evaluate_external(
        resolved, data, out=out, device=resolve_device(device), cache_dir=cache_dir, progress=progress, tta_flip=tta
    )
    t = f"{result['threshold']:g}"
    best = next((m for m in result["models"] if m["name"] == "ensemble"), result["models"][0])
    drop = best["dice_drop"].get(t)
    console.print(
        f"{best['name']} on {result['dataset']} ({result['n_images']} images, {result['resolution']} px): "
        f"Dice {best['at'][t]['dice']:.4f} at {t}" + (f", drop {drop:+.4f} vs in-domain" if drop is not None else ""),
        highlight=False,
        soft_wrap=True,
    )
    for warning in result["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True, markup=True)
    for path in result["written"]:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def _print_study(path: Path) -> None:
    typer.echo(path.read_text())
    console.print(f"wrote {path} and {path.with_suffix('.json')}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_command(
        run: Path = typer.Argument(..., help="CV run folder (written by polypseg cv)."),
        out_html: Path | None = typer.Option(
            None, "--out-html", help="Where to write the HTML (default RUN/report.html)."
        ),
        device: str = typer.Option("cpu", "--device", help="Device for the gallery's Grad-CAM: cpu | auto | cuda."),
    ) -> None:
        """Write RUN/report.html (self-contained, opens offline) and RUN/figures/*.png; works on a partial run."""
        from polypseg.cli.common import resolve_device
        from polypseg.reporting import write_report

        path = write_report(run, out_html=out_html, device=resolve_device(device))
        console.print(f"report: {path}", highlight=False, soft_wrap=True)

    @app.command("compare")
    def compare_command(
        runs: list[Path] = typer.Argument(
            ..., help="Two or more CV run folders on the same splits; the first is the reference."
        ),
        metric: list[str] = typer.Option(
            ["dice"],
            "--metric",
            help="Metric(s) for the paired test: dice, iou, boundary_f1, auc, sensitivity, precision (repeatable).",
        ),
        threshold: str = typer.Option(
            "0.5",
            "--threshold",
            help="0.5 (or any value in (0, 1)) for every run, or 'chosen' for each run's own threshold.",
        ),
        out: Path | None = typer.Option(
            None, "--out", help="Also write the table to this .md file (and the numbers to the .json beside it)."
        ),
    ) -> None:
        """One table of the runs' metrics (mean ± std over folds), the differences and paired tests across folds."""
        from polypseg.core.io_utils import atomic_write_json, atomic_write_text
        from polypseg.reporting.compare import compare_runs

        metrics = _metrics(metric)
        comparison = compare_runs(runs, threshold=threshold if threshold == "chosen" else _threshold(threshold))
        text = comparison.to_markdown(metrics)
        typer.echo(text)
        if out is not None:
            atomic_write_text(out, text)
            atomic_write_json(out.with_suffix(".json"), comparison.to_dict())
            console.print(f"wrote {out} and {out.with_suffix('.json')}", highlight=False, soft_wrap=True)

    @app.command("evaluate")
    def evaluate_command(
        model: Path = typer.Option(
            ...,
            "--model",
            help="CV run folder (each fold and their ensemble), one checkpoint, or a shipped model's name (polypseg models).",
        ),
        data: Path = typer.Option(
            ..., "--data", help="Another dataset (images/ + masks/, or Original/ + 'Ground Truth/')."
        ),
        out: Path | None = typer.Option(
            None,
            "--out",
            help="Folder for external_<dataset>.json/.md (default: the run folder; for a shipped model evaluate-NAME).",
        ),
        tta: bool | None = typer.Option(
            None,
            "--tta/--no-tta",
            help="Flip test-time augmentation. Default: the recipe's; otherwise the files are external_<dataset>_tta (or _no_tta).",
        ),
        device: str = DeviceOpt,
        cache_dir: Path | None = CacheOpt,
        progress: bool = ProgressOpt,
    ) -> None:
        """External validation without retraining: Dice, IoU, boundary F1 at the run's threshold and 0.5, and the Dice drop."""
        _evaluate(model, data, out=out, device=device, cache_dir=cache_dir, progress=progress, tta=tta)

    study = typer.Typer(
        help="The paper's proposed studies, each one resumable command (see docs/studies.md).",
        no_args_is_help=True,
        rich_markup_mode=None,  # as the main app: plain help
    )
    app.add_typer(study, name="study")

    @study.command("skip-ablation")
    def skip_ablation_command(
        out: Path = typer.Option(
            ..., "--out", help="Study folder: OUT/with-skips, OUT/no-skips, OUT/skip_ablation.{md,json}."
        ),
        data: Path | None = typer.Option(None, "--data", help=DATA_HELP),
        recipe: str | None = StudyRecipeOpt,
        folds: int | None = StudyFoldsOpt,
        seed: int | None = SeedOpt,
        encoder_weights: str | None = WeightsOpt,
        epochs: int | None = EpochsOpt,
        image_size: int | None = SizeOpt,
        overrides: list[str] = SetOpt,
        explain: bool = FoldExplainOpt,
        resume: bool = ResumeOpt,
        device: str = DeviceOpt,
        cache_dir: Path | None = CacheOpt,
        progress: bool = ProgressOpt,
    ) -> None:
        """U-Net with vs without skip connections on identical folds: Dice, IoU and boundary F1 with paired tests."""
        from polypseg.experiments.studies import run_skip_ablation

        base, saved_seed, saved_folds = _resumed_study(out / "with-skips", resume)
        config = RecipeChoices(
            recipe, encoder_weights, epochs=epochs, image_size=image_size, seed=seed, overrides=overrides
        ).build(base)
        keep_freed_memory_on_cpu(device)
        run_skip_ablation(
            data_or_sample(data),
            out,
            config,
            folds=folds or saved_folds or 5,
            seed=seed if seed is not None else saved_seed or 0,
            resume=resume,
            device=device,
            progress=progress,
            explain=explain,
            cache_dir=cache_dir,
        )
        _print_study(out / "skip_ablation.md")

    @study.command("encoder-init")
    def encoder_init_command(
        out: Path = typer.Option(
            ..., "--out", help="Study folder: OUT/imagenet, OUT/random, OUT/encoder_init.{md,json}."
        ),
        data: Path | None = typer.Option(None, "--data", help=DATA_HELP),
        encoder_weights: str = typer.Option(
            "imagenet",
            "--encoder-weights",
            help="The pretrained arm's weights: imagenet (smp's Hugging Face cache) or PATH to a torchvision ResNet state dict.",
        ),
        recipe: str | None = StudyRecipeOpt,
        folds: int | None = StudyFoldsOpt,
        seed: int | None = SeedOpt,
        epochs: int | None = EpochsOpt,
        image_size: int | None = SizeOpt,
        overrides: list[str] = SetOpt,
        explain: bool = FoldExplainOpt,
        resume: bool = ResumeOpt,
        device: str = DeviceOpt,
        cache_dir: Path | None = CacheOpt,
        progress: bool = ProgressOpt,
    ) -> None:
        """ImageNet vs random encoder initialisation on identical folds; stops at once if the weights cannot be had."""
        from polypseg.experiments.studies import run_encoder_init

        if encoder_weights == "none":
            raise UsageError(
                "--encoder-weights none: the pretrained arm needs 'imagenet' or a PATH (the random arm is built in)"
            )
        if encoder_weights != "imagenet" and not Path(encoder_weights).is_file():
            raise UsageError(f"--encoder-weights {encoder_weights}: not 'imagenet' or an existing file")
        base, saved_seed, saved_folds = _resumed_study(out / "imagenet", resume)
        config = RecipeChoices(recipe, epochs=epochs, image_size=image_size, seed=seed, overrides=overrides).build(base)
        keep_freed_memory_on_cpu(device)
        run_encoder_init(
            data_or_sample(data),
            out,
            config,
            imagenet_weights=encoder_weights,
            folds=folds or saved_folds or 5,
            seed=seed if seed is not None else saved_seed or 0,
            resume=resume,
            device=device,
            progress=progress,
            explain=explain,
            cache_dir=cache_dir,
        )
        _print_study(out / "encoder_init.md")

    @study.command("pranet")
    def pranet_command(
        data: Path = typer.Option(..., "--data", help="Kvasir-SEG folder (images/ + masks/)."),
        test_list: Path = typer.Option(
            ..., "--test-list", help="The 100 test stems, e.g. splits/pranet_kvasir_test100.txt."
        ),
        out: Path = typer.Option(..., "--out", help="Output folder (checkpoint, test_metrics.json, pranet.{md,json})."),
        recipe: str | None = StudyRecipeOpt,
        seed: int | None = SeedOpt,
        encoder_weights: str | None = WeightsOpt,
        epochs: int | None = EpochsOpt,
        image_size: int | None = SizeOpt,
        overrides: list[str] = SetOpt,
        resume: bool = ResumeOpt,
        device: str = DeviceOpt,
        cache_dir: Path | None = CacheOpt,
        progress: bool = ProgressOpt,
    ) -> None:
        """The PraNet protocol: train on the data minus --test-list, test once on it; mDice, mIoU (+ S, wF, E, MAE)."""
        from polypseg.experiments.pranet import run_pranet

        base, _, _ = _resumed_study(out, resume)
        config = RecipeChoices(
            recipe, encoder_weights, epochs=epochs, image_size=image_size, seed=seed, overrides=overrides
        ).build(base)
        keep_freed_memory_on_cpu(device)
        run_pranet(
            data,
            test_list,
            out=out,
            config=config,
            resume=resume,
            device=device,
            progress=progress,
            cache_dir=cache_dir,
        )
        _print_study(out / "pranet.md")

    @study.command("external")
    def external_command(
        model: Path = typer.Option(
            ...,
            "--model",
            help="CV run folder (each fold and their ensemble), one checkpoint, or a shipped model's name (polypseg models).",
        ),
        data: Path = typer.Option(
            ..., "--data", help="Another dataset (images/ + masks/, or Original/ + 'Ground Truth/')."
        ),
        out: Path | None = typer.Option(
            None,
            "--out",
            help="Folder for external_<dataset>.json/.md (default: the run folder; for a shipped model evaluate-NAME).",
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Accepted for symmetry: evaluation has no state and is simply rerun."
        ),
        device: str = DeviceOpt,
        cache_dir: Path | None = CacheOpt,
        progress: bool = ProgressOpt,
    ) -> None:
        """External validation: polypseg evaluate with the recipe's test-time augmentation (evaluate --tta/--no-tta chooses)."""
        _evaluate(model, data, out=out, device=device, cache_dir=cache_dir, progress=progress)


def _threshold(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"--threshold {value}: use a number in (0, 1) or 'chosen'") from None
    if not 0 < number < 1:
        raise UsageError(f"--threshold {value}: must lie strictly between 0 and 1")
    return number
