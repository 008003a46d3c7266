"""``polypseg train`` (one split) and ``polypseg cv`` (K-fold cross-validation)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from polypseg.cli.common import UsageError, console
from polypseg.config import RECIPES, RunConfig, apply_overrides, get_recipe

DEMO_NOTE = (
    "note: a low score is expected here. The demo recipe is a smoke run (a few epochs from random init, "
    "few training images per fold): it shows the whole pipeline works and says nothing about the method. "
    "For real results: polypseg cv --recipe paper --data data/kvasir-seg (see docs/recipes.md)."
)
DATA_HELP = "Dataset folder (images/ + masks/, or CVC-ClinicDB's Original/ + 'Ground Truth/'). Default: the bundled 40-image Kvasir-SEG sample."


def _data_or_sample(data: Optional[Path]) -> Path:
    if data is not None:
        return data
    from polypseg.sample_data import sample_dataset_path

    return sample_dataset_path()


def build_config(
    recipe: str | RunConfig,
    encoder_weights: Optional[str],
    skip_connections: Optional[bool],
    epochs: Optional[int],
    batch_size: Optional[int],
    lr: Optional[float],
    loss: Optional[str],
    image_size: Optional[int],
    seed: Optional[int],
    overrides: list[str],
) -> RunConfig:
    """The named recipe (or a saved run's config) with the command-line options applied (shortcuts first, then ``--set``)."""
    try:
        config = get_recipe(recipe) if isinstance(recipe, str) else RunConfig.from_dict(recipe.to_dict())
        shortcuts = {
            "model.encoder_weights": encoder_weights,
            "model.skip_connections": skip_connections,
            "train.epochs": epochs,
            "train.batch_size": batch_size,
            "train.lr": lr,
            "train.loss": loss,
            "train.image_size": image_size,
            "train.seed": seed,
        }
        for key, value in shortcuts.items():
            if value is not None:
                section, name = key.split(".")
                setattr(getattr(config, section), name, value)
        apply_overrides(config, overrides)
    except ValueError as error:
        raise UsageError(str(error)) from None
    from polypseg.losses import LOSSES

    if config.train.loss not in LOSSES:
        raise UsageError(f"--loss {config.train.loss}: choose one of {', '.join(LOSSES)}")
    weights = config.model.encoder_weights
    if weights not in ("none", "imagenet") and not Path(weights).is_file():
        raise UsageError(f"--encoder-weights {weights}: not 'imagenet', 'none' or an existing file")
    from polypseg.models import create_model

    try:
        # Fail now, not after caching the data: unknown arch, encoder or attention, unreachable weights.
        create_model(config.model)
    except (ValueError, KeyError) as error:
        message = str(error.args[0]) if error.args else str(error)
        raise UsageError(f"invalid model settings: {message[:300]}") from None
    return config


def _saved_config(path: Path, key: str | None = None) -> RunConfig | None:
    """The config a run folder was started with (``None`` if there is none yet)."""
    if not path.is_file():
        return None
    from polypseg.io_utils import read_json

    data = read_json(path)
    return RunConfig.from_dict(data[key] if key else data)


# Options shared by train and cv (typer needs them spelled out per command).
RecipeOpt = typer.Option(None, "--recipe", help=f"Named recipe: {', '.join(RECIPES)} (see docs/recipes.md). Default: paper, or the run's own with --resume.")
WeightsOpt = typer.Option(None, "--encoder-weights", help="imagenet | none | PATH to a torchvision ResNet state dict (.pth/.safetensors). Recipe default: none.")
SkipOpt = typer.Option(None, "--skip/--no-skip", help="U-Net skip connections (--no-skip: the paper's skip ablation).")
EpochsOpt = typer.Option(None, "--epochs", min=1, help="Override the recipe's epochs.")
BatchOpt = typer.Option(None, "--batch-size", min=1, help="Override the recipe's batch size (global, across GPUs).")
LrOpt = typer.Option(None, "--lr", min=0.0, help="Override the recipe's learning rate.")
LossOpt = typer.Option(None, "--loss", help="dice | dice_bce | bce | focal_dice | tversky.")
SizeOpt = typer.Option(None, "--image-size", min=32, help="Override the training resolution (square).")
SeedOpt = typer.Option(None, "--seed", help="Seed for training (and the split, for cv).")
SetOpt = typer.Option([], "--set", help="Any config field, e.g. --set train.ema_decay=0.999 (repeatable).")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")


def register(app: typer.Typer) -> None:
    @app.command("cv")
    def cv_command(
        out: Path = typer.Option(..., "--out", help="Run folder (created; holds splits.json, fold_*/, summary.*)."),
        data: Optional[Path] = typer.Option(None, "--data", help=DATA_HELP),
        folds: Optional[int] = typer.Option(None, "--folds", min=2, help="Number of folds (default 5)."),
        recipe: Optional[str] = RecipeOpt,
        encoder_weights: Optional[str] = WeightsOpt,
        skip: Optional[bool] = SkipOpt,
        epochs: Optional[int] = EpochsOpt,
        batch_size: Optional[int] = BatchOpt,
        lr: Optional[float] = LrOpt,
        loss: Optional[str] = LossOpt,
        image_size: Optional[int] = SizeOpt,
        seed: Optional[int] = SeedOpt,
        overrides: list[str] = SetOpt,
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (finished folds are kept as they are); starts it if --out holds none. Options given with it must match the run's."),
        explain: bool = typer.Option(True, "--explain/--no-explain", help="Measure Grad-CAM on each fold's held-out images."),
        explain_max_images: Optional[int] = typer.Option(None, "--explain-max-images", min=1, help="Limit the Grad-CAM checks to the first N held-out images per fold."),
        only_fold: list[int] = typer.Option([], "--only-fold", help="Run only this fold (repeatable), e.g. to choose a recipe on fold 0; the summary covers finished folds."),
        device: str = DeviceOpt,
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the preprocessed cache lives (default $POLYPSEG_CACHE or ~/.cache/polypseg)."),
        progress: bool = ProgressOpt,
    ) -> None:
        """K-fold cross-validation: train each fold, pool out-of-fold predictions, write RUN/summary.{json,md}.

        Example (the paper's setting): polypseg cv --data Kvasir-SEG --out runs/paper --recipe paper
        """
        from polypseg.cv import run_cv

        saved = _saved_config(out / "config.json", key="run") if resume else None
        options = (recipe, encoder_weights, skip, epochs, batch_size, lr, loss, image_size, seed)
        config = None  # resuming with no options: the run's own config
        if saved is None or any(v is not None for v in options) or overrides:
            # Given with --resume, the result is checked against the saved config by run_cv.
            base = recipe if recipe is not None else (saved or "paper")
            config = build_config(base, encoder_weights, skip, epochs, batch_size, lr, loss, image_size, seed, overrides)
        summary = run_cv(
            _data_or_sample(data),
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
        if summary:
            ms = summary["mean_std"]["at_chosen"]
            console.print(
                f"Dice {ms['dice'][0]:.4f} ± {ms['dice'][1]:.4f}, IoU {ms['iou'][0]:.4f} ± {ms['iou'][1]:.4f} "
                f"at threshold {summary['threshold']:g}"
            )
            if summary.get("recipe") == "demo":
                console.print(DEMO_NOTE, highlight=False, soft_wrap=True)
            console.print(f"summary: {Path(out) / 'summary.md'}")
            if (Path(out) / "report.html").is_file():
                console.print(f"report:  {Path(out) / 'report.html'}")

    @app.command("bench-train")
    def bench_train_command(
        recipe: Optional[str] = RecipeOpt,
        batch_size: Optional[int] = BatchOpt,
        image_size: Optional[int] = SizeOpt,
        overrides: list[str] = SetOpt,
        device: str = DeviceOpt,
        steps: int = typer.Option(30, "--steps", min=1, help="Timed training steps (run back to back, one sync at the end)."),
        warmup: int = typer.Option(5, "--warmup", min=1, help="Untimed steps first (the first one, with any compilation, is reported)."),
        train_images: int = typer.Option(800, "--train-images", min=1, help="Images per epoch for the epoch and run-time estimates (800: a Kvasir-SEG fold)."),
        label: Optional[str] = typer.Option(None, "--label", help="Name of this setting in the table (default: the recipe's)."),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON."),
        markdown: bool = typer.Option(False, "--markdown", help="Print a markdown table row on stdout."),
    ) -> None:
        """Training speed of a recipe on this machine: step time, images/s, and the time an epoch and a fold's run would take.

        Example: polypseg bench-train --recipe strong --device cuda --markdown
        """
        from polypseg.bench import benchmark_training, training_markdown
        from polypseg.cli.common import resolve_device
        from polypseg.io_utils import atomic_write_json

        config = build_config(recipe or "paper", None, None, None, batch_size, None, None, image_size, None, overrides)
        with console.status(f"timing {warmup} + {steps} training steps of recipe '{config.train.recipe}'"):
            result = benchmark_training(config, resolve_device(device), steps=steps, warmup=warmup, train_images=train_images)
        result["label"] = label or config.train.recipe
        console.print(
            f"{result['device_name']}: {result['step_ms']:.1f} ms per step of {result['batch_size']} "
            f"= {result['images_per_s']:.0f} images/s; an epoch of {train_images} images {result['epoch_s']:.1f} s, "
            f"{result['epochs']} epochs {result['run_minutes']:.1f} min (training only; first step {result['first_step_s']:.1f} s)",
            highlight=False,
            soft_wrap=True,
        )
        if json_path is not None:
            atomic_write_json(json_path, result)
        if markdown:
            print(training_markdown([result]))

    @app.command("train")
    def train_command(
        out: Path = typer.Option(..., "--out", help="Output folder (best.safetensors/json, history.json, test_metrics.json)."),
        data: Optional[Path] = typer.Option(None, "--data", help=DATA_HELP),
        test_list: Optional[Path] = typer.Option(None, "--test-list", help="File of stems held out as the test set (one per line), evaluated once at the end, e.g. the PraNet split."),
        recipe: Optional[str] = RecipeOpt,
        encoder_weights: Optional[str] = WeightsOpt,
        skip: Optional[bool] = SkipOpt,
        epochs: Optional[int] = EpochsOpt,
        batch_size: Optional[int] = BatchOpt,
        lr: Optional[float] = LrOpt,
        loss: Optional[str] = LossOpt,
        image_size: Optional[int] = SizeOpt,
        seed: Optional[int] = SeedOpt,
        overrides: list[str] = SetOpt,
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted training in --out."),
        device: str = DeviceOpt,
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Preprocessed cache folder."),
        progress: bool = ProgressOpt,
    ) -> None:
        """Train one model on one split: the data minus --test-list, best epoch chosen on an inner validation split."""
        from polypseg.train_split import train_single_split

        saved = _saved_config(out / "config.json") if resume else None
        base = recipe if recipe is not None else (saved or "paper")
        config = build_config(base, encoder_weights, skip, epochs, batch_size, lr, loss, image_size, seed, overrides)
        result = train_single_split(
            _data_or_sample(data), out, config, test_list=test_list, resume=resume, device=device, progress=progress, cache_dir=cache_dir
        )
        console.print(f"checkpoint: {result['checkpoint']}")
        if "test" in result:
            t = result["test"]["at"]["0.5"]
            console.print(f"test ({result['test']['n_images']} images): Dice {t['dice']:.4f}, IoU {t['iou']:.4f} at 0.5")
            if config.train.recipe == "demo":
                console.print(DEMO_NOTE, highlight=False, soft_wrap=True)
