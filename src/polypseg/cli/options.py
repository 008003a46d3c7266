"""Command-line options that several commands share, and the recipe choices they make.

Typer needs each option spelled out in every command's signature; the option objects and their
help live here once, and :class:`RecipeChoices` turns what was given into a validated config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import typer

from polypseg.cli.common import UsageError
from polypseg.core.config import ConfigError, RunConfig, apply_overrides, validate_config
from polypseg.core.recipes import RECIPES, get_recipe

DATA_HELP = "Dataset folder (images/ + masks/, or CVC-ClinicDB's Original/ + 'Ground Truth/'). Default: the bundled 40-image Kvasir-SEG sample."

RecipeOpt = typer.Option(
    None,
    "--recipe",
    help=f"Named recipe: {', '.join(RECIPES)} (see docs/recipes.md). Default: paper, or the run's own with --resume.",
)
BenchRecipeOpt = typer.Option(
    None,
    "--recipe",
    help=f"Named recipe to time: {', '.join(RECIPES)} (see docs/recipes.md). Default: paper.",
)
StudyRecipeOpt = typer.Option(
    None,
    "--recipe",
    help=f"Named recipe for every arm: {', '.join(RECIPES)} (see docs/recipes.md). Default: paper, or the study's own with --resume.",
)
WeightsOpt = typer.Option(
    None,
    "--encoder-weights",
    help="imagenet | none | PATH to a torchvision ResNet state dict (.pth/.safetensors). Recipe default: none.",
)
InitOpt = typer.Option(
    None,
    "--init",
    help="Fine-tune: start the whole network from a trained model (a shipped name such as kvasir-unet-r34, "
    "a checkpoint, or a training run folder) of the same architecture. Default: none (random init, or --encoder-weights).",
)
SkipOpt = typer.Option(None, "--skip/--no-skip", help="U-Net skip connections (--no-skip: the paper's skip ablation).")
EpochsOpt = typer.Option(None, "--epochs", min=1, help="Override the recipe's epochs.")
BatchOpt = typer.Option(None, "--batch-size", min=1, help="Override the recipe's batch size (global, across GPUs).")
LrOpt = typer.Option(None, "--lr", help="Override the recipe's learning rate (> 0).")
LossOpt = typer.Option(None, "--loss", help="dice | dice_bce | bce | focal_dice | tversky.")
SizeOpt = typer.Option(
    None, "--image-size", help="Override the training resolution (square; a multiple of 32, e.g. 256)."
)
SeedOpt = typer.Option(
    None, "--seed", min=0, help="Seed for training and, for cross-validation, the split (default 0)."
)
SetOpt = typer.Option([], "--set", help="Any config field, e.g. --set train.ema_decay=0.999 (repeatable).")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
FoldExplainOpt = typer.Option(True, "--explain/--no-explain", help="Measure Grad-CAM on each fold's held-out images.")
CacheOpt = typer.Option(
    None, "--cache-dir", help="Preprocessed cache folder (default $POLYPSEG_CACHE or ~/.cache/polypseg)."
)
PrecisionOpt = typer.Option(
    None,
    "--precision",
    help="auto | fp32 | bf16. auto: bf16 autocast + channels-last on CUDA and on CPUs with native bf16 "
    "(amx_bf16/avx512_bf16), fp32 elsewhere; the run saves the choice. Recipe default: auto.",
)


# How the command line names the config fields it validates.
OPTION_LABELS = {
    "train.precision": "--precision",
    "train.loss": "--loss",
    "train.optimizer": "--set train.optimizer",
    "train.schedule": "--set train.schedule",
    "model.encoder_weights": "--encoder-weights",
    "train.init_from": "--init",
}


def build_config(
    recipe: str | RunConfig,
    *,
    encoder_weights: str | None = None,
    skip_connections: bool | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    loss: str | None = None,
    image_size: int | None = None,
    seed: int | None = None,
    overrides: Sequence[str] = (),
    precision: str | None = None,
    init_from: str | None = None,
) -> RunConfig:
    """The named recipe (or a saved run's config) with the command-line options applied (shortcuts
    first, then ``--set``), validated by :func:`polypseg.core.config.validate_config`."""
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
            "train.precision": precision,
            "train.init_from": init_from,
        }
        for key, value in shortcuts.items():
            if value is not None:
                section, name = key.split(".")
                setattr(getattr(config, section), name, value)
        apply_overrides(config, list(overrides))
        from polypseg.models.factory import check_model_config

        validate_config(config, labels=OPTION_LABELS)
        check_model_config(config.model)
        from polypseg.training.init_source import init_checkpoint

        init_checkpoint(config)  # a bad --init fails before the data is read, from its metadata alone
        return config
    except ConfigError as error:
        raise UsageError(str(error)) from None


def say_init_size(config: RunConfig) -> None:
    """One line when the ``--init`` model was trained at another input size than this run trains at:
    fine-tuning at another size changes the scale at which it sees polyps (sometimes on purpose)."""
    from polypseg.cli.common import console
    from polypseg.training.init_source import init_image_size

    size = init_image_size(config)
    if size is not None and size != config.train.image_size:
        console.print(
            f"note: --init {config.train.init_from} was trained at {size} px; this run trains at "
            f"{config.train.image_size} px (--image-size {size} keeps its scale)",
            soft_wrap=True,
        )


def data_or_sample(data: Path | None) -> Path:
    """``--data`` as given, or the bundled sample when it was omitted."""
    if data is not None:
        return data
    from polypseg.data.sample_data import sample_dataset_path

    return sample_dataset_path()


@dataclass(frozen=True)
class RecipeChoices:
    """The recipe options of a command as given (``None``: not given), before a recipe is applied."""

    recipe: str | None = None
    encoder_weights: str | None = None
    skip_connections: bool | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    loss: str | None = None
    image_size: int | None = None
    seed: int | None = None
    precision: str | None = None
    init_from: str | None = None
    overrides: Sequence[str] = ()

    @classmethod
    def of(cls, parameters: dict[str, Any]) -> RecipeChoices:
        """From a command's parameters (``locals()``), which must name every field."""
        return cls(**{f.name: parameters[f.name] for f in fields(cls)})

    def any_given(self) -> bool:
        return bool(self.overrides) or any(
            getattr(self, f.name) is not None for f in fields(self) if f.name != "overrides"
        )

    def build(self, default: str | RunConfig = "paper") -> RunConfig:
        """``--recipe`` (else ``default``: a recipe name or a saved run's config) with the other options applied."""
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "recipe"}
        return build_config(self.recipe if self.recipe is not None else default, **given)
