"""``polypseg train`` (one split) and ``polypseg cv`` (K-fold cross-validation)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from polypseg.cli.common import UsageError, console, fail, keep_freed_memory_on_cpu, write_json
from polypseg.cli.options import (
    DATA_HELP,
    BatchOpt,
    BenchRecipeOpt,
    CacheOpt,
    DeviceOpt,
    EpochsOpt,
    FoldExplainOpt,
    InitOpt,
    LossOpt,
    LrOpt,
    PrecisionOpt,
    ProgressOpt,
    RecipeChoices,
    RecipeOpt,
    SeedOpt,
    SetOpt,
    SizeOpt,
    SkipOpt,
    WeightsOpt,
    build_config,
    data_or_sample,
    say_init_size,
)
from polypseg.core.config import RunConfig
from polypseg.core.recipes import get_recipe

DEMO_NOTE = (
    "note: a low score is expected here. The demo recipe is a smoke run (a few epochs from random init, "
    "few training images per fold): it shows the whole pipeline works and says nothing about the method. "
    "For real results: polypseg cv --recipe paper --data data/kvasir-seg (see docs/recipes.md)."
)


def _saved_config(out: Path) -> RunConfig | None:
    """The config a run folder was started with, CV run or training folder (``None`` if there is none yet)."""
    from polypseg.core.runs import RunDir

    settings = RunDir(out).saved_settings()
    return settings.config if settings is not None else None


def _say_precision(config: RunConfig, device: str) -> None:
    from polypseg.cli.common import resolve_device
    from polypseg.core.precision import describe

    chosen = resolve_device(device)
    console.print(describe(config.train.precision, chosen, config.train.channels_last), highlight=False)
    if config.train.compile and not chosen.startswith("cuda"):
        # torch.compile of the training step pays on CUDA only (docs/benchmarks.md: slower on both CPUs measured)
        console.print(f"note: train.compile applies on CUDA only; on {chosen} the model trains uncompiled")


def _size_adapt_recipe(config: RunConfig, choices: RecipeChoices, data: Path, test_list: Path | None) -> None:
    """Scale the ``adapt`` recipe's epochs, warm-up and learning rate to the training set's size and
    train at the --init model's input size; --epochs, --lr, --image-size or --set of those fields
    keep the user's values."""
    from polypseg.training.adapt import match_init_size, scale_to_set_size, training_set_size

    def given(option: object, *keys: str) -> bool:
        return option is not None or any(o.split("=", 1)[0].strip() in keys for o in choices.overrides)

    if not given(choices.image_size, "train.image_size"):
        size = match_init_size(config)
        if size is not None:
            console.print(
                f"adapt: training at {size} px, the input size of --init {escape(config.train.init_from)}",
                highlight=False,
                soft_wrap=True,
            )

    n_train = training_set_size(data, config, test_list=test_list)
    plan = scale_to_set_size(
        config,
        n_train,
        keep_epochs=given(choices.epochs, "train.epochs", "train.warmup_epochs"),
        keep_lr=given(choices.lr, "train.lr"),
    )
    console.print(plan.describe(), highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("cv")
    def cv_command(
        out: Path = typer.Option(..., "--out", help="Run folder (created; holds splits.json, fold_*/, summary.*)."),
        data: Path | None = typer.Option(None, "--data", help=DATA_HELP),
        folds: int | None = typer.Option(None, "--folds", min=2, help="Number of folds (default 5)."),
        recipe: str | None = RecipeOpt,
        encoder_weights: str | None = WeightsOpt,
        skip_connections: bool | None = SkipOpt,
        epochs: int | None = EpochsOpt,
        batch_size: int | None = BatchOpt,
        lr: float | None = LrOpt,
        loss: str | None = LossOpt,
        image_size: int | None = SizeOpt,
        seed: int | None = SeedOpt,
        overrides: list[str] = SetOpt,
        precision: str | None = PrecisionOpt,
        init_from: str | None = InitOpt,
        resume: bool = typer.Option(
            False,
            "--resume",
            help="Continue the run in --out (finished folds are kept as they are); starts it if --out holds none. Options given with it must match the run's.",
        ),
        explain: bool = FoldExplainOpt,
        explain_max_images: int | None = typer.Option(
            None,
            "--explain-max-images",
            min=1,
            help="Limit the Grad-CAM checks to the first N held-out images per fold.",
        ),
        only_fold: list[int] = typer.Option(
            [],
            "--only-fold",
            help="Run only this fold (repeatable), e.g. to choose a recipe on fold 0; the summary covers finished folds.",
        ),
        device: str = DeviceOpt,
        cache_dir: Path | None = CacheOpt,
        progress: bool = ProgressOpt,
    ) -> None:
        """K-fold cross-validation: train each fold, pool out-of-fold predictions, write RUN/summary.{json,md}.

        Example (the paper's setting): polypseg cv --data Kvasir-SEG --out runs/paper --recipe paper
        """
        from polypseg.data.inputs import check_output_path
        from polypseg.experiments.cv import run_cv

        check_output_path(out, "--out", folder=True)
        saved = _saved_config(out) if resume else None
        choices = RecipeChoices.of(locals())
        config = None  # resuming with no options: the run's own config
        if saved is None or choices.any_given():
            # Given with --resume, the result is checked against the saved config by run_cv.
            config = choices.build(saved or "paper")
        _say_precision(config or saved or get_recipe("paper"), device)
        keep_freed_memory_on_cpu(device)
        if config is not None and config.train.init_from != "none":
            say_init_size(config)
            console.print(
                f"[yellow]note:[/] every fold starts from {escape(config.train.init_from)}: if it was trained on any "
                "of these images, their folds' held-out scores are not held out.",
                highlight=False,
                soft_wrap=True,
                markup=True,
            )
        summary = run_cv(
            data_or_sample(data),
            out,
            config,
            folds=folds,
            seed=seed,
            resume=resume,
            device=device,
            progress=progress,
            explain=explain,
            explain_max_images=explain_max_images,
            cache_dir=cache_dir,
            only_folds=only_fold or None,
        )
        if summary is not None:
            # Held-out figures first; the threshold chosen on the same predictions it scores comes last, labelled.
            fixed, chosen = summary.mean_std.at_0_5, summary.mean_std.at_chosen
            console.print(
                f"Dice {fixed['dice'][0]:.4f} ± {fixed['dice'][1]:.4f}, IoU {fixed['iou'][0]:.4f} ± {fixed['iou'][1]:.4f} "
                "at threshold 0.5"
            )
            fair = summary.mean_std.at_crossfit
            if fair is not None:
                console.print(
                    f"Dice {fair['dice'][0]:.4f} ± {fair['dice'][1]:.4f} with each fold's threshold chosen on the "
                    "other folds only (no image helps choose the threshold it is scored at)",
                    soft_wrap=True,
                )
            console.print(
                f"Dice {chosen['dice'][0]:.4f} ± {chosen['dice'][1]:.4f}, IoU {chosen['iou'][0]:.4f} ± "
                f"{chosen['iou'][1]:.4f} at threshold {summary.threshold:g}, chosen on these same out-of-fold "
                "predictions (slightly optimistic)",
                soft_wrap=True,
            )
            if summary.recipe == "demo":
                console.print(DEMO_NOTE, highlight=False, soft_wrap=True)
            from polypseg.core.runs import RunDir

            run = RunDir(out)
            console.print(f"summary: {run.summary_md_path}")
            if run.report_path.is_file():
                console.print(f"report:  {run.report_path}")

    @app.command("bench-train")
    def bench_train_command(
        recipe: str | None = BenchRecipeOpt,
        batch_size: int | None = BatchOpt,
        image_size: int | None = SizeOpt,
        overrides: list[str] = SetOpt,
        precision: str | None = PrecisionOpt,
        device: str = DeviceOpt,
        steps: int = typer.Option(
            30, "--steps", min=1, help="Timed training steps (run back to back, one sync at the end)."
        ),
        warmup: int = typer.Option(
            5, "--warmup", min=1, help="Untimed steps first (the first one, with any compilation, is reported)."
        ),
        train_images: int = typer.Option(
            800,
            "--train-images",
            min=1,
            help="Images per epoch for the epoch and run-time estimates (800: a Kvasir-SEG fold).",
        ),
        label: str | None = typer.Option(
            None, "--label", help="Name of this setting in the table (default: the recipe's)."
        ),
        variants: str = typer.Option(
            "auto",
            "--variants",
            help="Comma-separated: recipe, fp32-nchw, fp32-cl, bf16-cl, bf16-cl-compiled. auto: on CPU the first three "
            "side by side (fp32 NCHW, fp32 channels-last, bf16 channels-last), elsewhere the recipe as it trains.",
        ),
        rounds: int = typer.Option(
            3,
            "--rounds",
            min=1,
            help="With several variants: timed rounds, variants interleaved in each; the median round counts.",
        ),
        peak: bool = typer.Option(
            True,
            "--peak/--no-peak",
            help="Also measure this machine's bf16/fp32 matmul peak and report the model's fraction of it.",
        ),
        breakdown: bool = typer.Option(
            False,
            "--breakdown",
            help="Instead: where an epoch's time goes (augment, forward, backward, optimizer, EMA, validation, checkpoint writes).",
        ),
        json_path: Path | None = typer.Option(None, "--json", help="Write the rows as a JSON list."),
        markdown: bool = typer.Option(False, "--markdown", help="Print the markdown table on stdout."),
    ) -> None:
        """Training speed of a recipe on this machine: step time, images/s, TFLOP/s, and the time an epoch and a run would take.

        On CPU it times fp32 NCHW, fp32 channels-last and bf16 channels-last side by side by default.

        Example: polypseg bench-train --recipe paper --device cpu --markdown
        """
        from polypseg.cli.common import resolve_device
        from polypseg.data.inputs import check_output_path
        from polypseg.experiments.bench_train import CPU_VARIANTS, TRAIN_VARIANTS, benchmark_training, training_markdown

        if json_path is not None:
            check_output_path(json_path, "--json")
        config = build_config(
            recipe or "paper", batch_size=batch_size, image_size=image_size, overrides=overrides, precision=precision
        )
        torch_device = resolve_device(device)
        keep_freed_memory_on_cpu(device)  # time the step as polypseg train and cv run it
        if breakdown:
            from polypseg.experiments.bench_train import breakdown_markdown, training_breakdown

            with console.status(f"timing the parts of an epoch of recipe '{config.train.recipe}'"):
                result = training_breakdown(
                    config, device=torch_device, steps=steps, warmup=warmup, train_images=train_images
                )
            console.print(
                f"{result['device_name']}, {result['precision']}, {result['threads']} threads", highlight=False
            )
            print(breakdown_markdown(result))
            if json_path is not None:
                write_json(json_path, result, "--json")
            return
        if variants == "auto":
            chosen = CPU_VARIANTS if torch_device == "cpu" and precision is None else ("recipe",)
        else:
            chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
            unknown = [v for v in chosen if v not in TRAIN_VARIANTS]
            if unknown or not chosen:
                fail(f"--variants {variants}: choose from {', '.join(TRAIN_VARIANTS)} or auto")
        rounds = rounds if len(chosen) > 1 else 1
        with console.status(
            f"timing {', '.join(chosen)}: {warmup} + {rounds} x {steps} training steps of recipe '{config.train.recipe}'"
        ):
            rows = benchmark_training(
                config,
                device=torch_device,
                steps=steps,
                warmup=warmup,
                train_images=train_images,
                variants=chosen,
                rounds=rounds,
                peak=peak,
            )
        for row in rows:
            row["label"] = label or config.train.recipe
            fraction = (
                f", {100 * row['fraction_of_bf16_peak']:.0f}% of the bf16 matmul peak"
                if "fraction_of_bf16_peak" in row
                else ""
            )
            paired = (
                f" ({row['speedup_vs_first']:.2f}x {row['first_variant']}, median of {rounds} paired rounds)"
                if len(rows) > 1 and row is not rows[0]
                else ""
            )
            console.print(
                f"{row['variant']}: {row['step_ms']:.1f} ms per step of {row['batch_size']} = {row['images_per_s']:.1f} images/s{paired}, "
                f"{row['achieved_tflops']:.2f} TFLOP/s{fraction}; an epoch of {train_images} images {row['epoch_s']:.1f} s, "
                f"{row['epochs']} epochs {row['run_minutes']:.1f} min (training only; first step {row['first_step_s']:.1f} s)",
                highlight=False,
                soft_wrap=True,
            )
        console.print(f"on {rows[0]['device_name']} {rows[0]['cpu_flags']}".rstrip(), highlight=False, soft_wrap=True)
        if json_path is not None:
            write_json(json_path, rows, "--json")
        if markdown:
            print(training_markdown(rows))

    @app.command("train")
    def train_command(
        out: Path = typer.Option(
            ..., "--out", help="Output folder (best.safetensors/json, history.json, test_metrics.json)."
        ),
        data: Path | None = typer.Option(None, "--data", help=DATA_HELP),
        test_list: Path | None = typer.Option(
            None,
            "--test-list",
            help="File of stems held out as the test set (one per line), evaluated once at the end, e.g. the PraNet split.",
        ),
        recipe: str | None = RecipeOpt,
        encoder_weights: str | None = WeightsOpt,
        skip_connections: bool | None = SkipOpt,
        epochs: int | None = EpochsOpt,
        batch_size: int | None = BatchOpt,
        lr: float | None = LrOpt,
        loss: str | None = LossOpt,
        image_size: int | None = SizeOpt,
        seed: int | None = SeedOpt,
        overrides: list[str] = SetOpt,
        precision: str | None = PrecisionOpt,
        init_from: str | None = InitOpt,
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted training in --out."),
        device: str = DeviceOpt,
        cache_dir: Path | None = CacheOpt,
        progress: bool = ProgressOpt,
    ) -> None:
        """Train one model on one split: the data minus --test-list, best epoch chosen on an inner validation split.

        Example (the PraNet split): polypseg train --data data/kvasir-seg --test-list splits/pranet_kvasir_test100.txt --out runs/one
        """
        from polypseg.core.io_utils import display_name
        from polypseg.data.inputs import check_output_path
        from polypseg.training.train_split import train_single_split

        check_output_path(out, "--out", folder=True)
        if test_list is not None and not test_list.is_file():
            why = "is a folder" if test_list.is_dir() else "not found"
            raise UsageError(f"--test-list {display_name(test_list)}: {why} (a file of stems, one per line)")
        saved = _saved_config(out) if resume else None
        choices = RecipeChoices.of(locals())
        config = choices.build(saved or "paper")
        if config.train.recipe == "adapt" and (saved is None or choices.recipe is not None):
            # Built from the recipe (not the saved config): sized as its start was, so a resume with
            # the very start command compares equal to the saved settings.
            _size_adapt_recipe(config, choices, data_or_sample(data), test_list)
        if saved is None:
            say_init_size(config)
        if config.train.replay_images:
            console.print(
                f"replay: {config.train.replay_images} pairs of {escape(config.train.replay_data)} join the training part",
                highlight=False,
                soft_wrap=True,
            )
            from polypseg.training.init_source import init_held_out_note

            unseen = init_held_out_note(config)
            if unseen is not None:
                console.print(
                    f"[yellow]note:[/] --init {escape(config.train.init_from)} never saw {escape(unseen)}; "
                    "its files list no stems, so keep those images out of train.replay_data to keep them unseen",
                    highlight=False,
                    soft_wrap=True,
                )
        _say_precision(config, device)
        keep_freed_memory_on_cpu(device)
        result = train_single_split(
            data_or_sample(data),
            out,
            config,
            test_list=test_list,
            resume=resume,
            device=device,
            progress=progress,
            cache_dir=cache_dir,
        )
        console.print(f"checkpoint: {result['checkpoint']}")
        if "test" in result:
            t = result["test"]["at"]["0.5"]
            console.print(
                f"test ({result['test']['n_images']} images): Dice {t['dice']:.4f}, IoU {t['iou']:.4f} at 0.5"
            )
            if config.train.recipe == "demo":
                console.print(DEMO_NOTE, highlight=False, soft_wrap=True)
