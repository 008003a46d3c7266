"""The named recipes: complete training configurations, each a function returning a fresh :class:`RunConfig`.

``get_recipe(name)`` is the one way to have one; ``RECIPES`` lists them. Their fields, overrides and
validation live in :mod:`polypseg.core.config`.
"""

from __future__ import annotations

from typing import Any

from polypseg.core.config import AugmentConfig, ConfigError, ModelConfig, RunConfig, TrainConfig


def _paper() -> RunConfig:
    return RunConfig()


def _heavy_augment() -> AugmentConfig:
    """The paper's augmentations, stronger, plus random resized crops and saturation (strong, cpu)."""
    return AugmentConfig(
        rotate_degrees=45.0,
        rotate_p=0.7,
        brightness=0.25,
        contrast=0.25,
        color_p=0.8,
        crop_scale_min=0.5,
        crop_p=0.5,
        hue_saturation=0.1,
    )


def _strong() -> RunConfig:
    """From random init at GPU length: longer schedule, Dice+BCE, EMA, flip TTA.

    A starting point, not yet measured: each lever is to be chosen on fold 0 only (docs/results.md
    says what has been measured so far).
    """
    train = TrainConfig(
        recipe="strong",
        epochs=200,
        batch_size=32,
        optimizer="adamw",
        lr=2e-3,
        weight_decay=1e-4,
        schedule="onecycle",
        warmup_epochs=5,
        loss="dice_bce",
        augment=_heavy_augment(),
        val_fraction=0.0,
        ema_decay=0.999,
        tta_flip=True,
        compile=True,
    )
    return RunConfig(model=ModelConfig(), train=train)


def _demo() -> RunConfig:
    """Small enough to finish on a 2-core CPU in a few minutes on the bundled 40-image sample.

    A smoke run of the whole pipeline, not of the paper's network: a MobileNet-V2 U-Net with a
    thin decoder (3.1M parameters, 12 MB a fold) keeps a finished 5-fold demo run at tens of MB.
    """
    train = TrainConfig(
        recipe="demo",
        image_size=128,
        epochs=15,
        batch_size=8,
        lr=3e-3,
        loss="dice_bce",
        val_fraction=0.0,
        eval_batch_size=8,
    )
    return RunConfig(model=ModelConfig(encoder="mobilenet_v2", decoder_channels=(64, 32, 16, 16, 8)), train=train)


def _cpu() -> RunConfig:
    """The recipe of the shipped model, sized for a 2-core CPU (a few hours in bf16), random init.

    Fixed before training from fold-0 references on a GPU, not tuned on any test image: one-cycle
    lr 2e-3 with Dice+BCE beat the paper's constant 1e-4 Dice recipe (0.849 vs 0.784 at 100 vs 30
    epochs); progressive resizing buys the extra epochs: 36 epochs at 160 px cost about 14 at 256.
    The best epoch is chosen on 10% of the training images (polypseg train's inner validation).
    """
    train = TrainConfig(
        recipe="cpu",
        epochs=60,
        batch_size=16,
        optimizer="adamw",
        lr=2e-3,
        weight_decay=1e-4,
        schedule="onecycle",
        warmup_epochs=2,
        loss="dice_bce",
        progressive_size=160,
        progressive_epochs=36,
        augment=_heavy_augment(),
        val_fraction=0.1,
        ema_decay=0.998,
        eval_batch_size=16,
    )
    return RunConfig(model=ModelConfig(), train=train)


def _cpu_refine() -> RunConfig:
    """A second one-cycle at 256 px from a trained ``cpu`` model (``--init``): a warm restart.

    The shipped model's stage 2. The ``cpu`` recipe's validation curve was still rising at its
    last epoch, so a restart at a quarter of its peak lr buys more than its 60 epochs again would
    for a third of the cost. Same split and augmentations as ``cpu``; no progressive resizing.
    """
    config = _cpu()
    train = config.train
    train.recipe, train.epochs, train.lr = "cpu-refine", 30, 5e-4
    train.progressive_size, train.progressive_epochs = 0, 0
    return config


def _cross_centre_augment() -> AugmentConfig:
    """``cpu``'s augmentations plus what another centre's endoscope changes: colour, optics, scale."""
    augment = _heavy_augment()
    augment.crop_p = 0.35
    augment.zoom_out_max, augment.zoom_out_p = 1.6, 0.25
    augment.color_cast, augment.gamma = 0.1, 0.3
    augment.vignette_strength, augment.vignette_p = 0.5, 0.3
    augment.specular_p = 0.3
    augment.blur_sigma, augment.blur_p = 1.5, 0.2
    augment.noise_std, augment.noise_p = 0.04, 0.2
    return augment


def _cpu_robust() -> RunConfig:
    """A warm restart at 256 px from a trained model (``--init``), with cross-centre augmentations.

    The shipped model's validation Dice was still rising when its last stage ended, and it loses
    0.1-0.15 Dice on another centre's frames; so: 30 more epochs (about an hour on 2 cores in bf16)
    at a peak lr of 7e-4, with augmentations for colour casts, gamma, vignetting, specular
    highlights, blur, sensor noise and smaller polyps. Same inner validation split as ``cpu``.
    """
    config = _cpu_refine()
    train = config.train
    train.recipe, train.epochs, train.lr = "cpu-robust", 30, 7e-4
    train.augment = _cross_centre_augment()
    return config


def _cpu_hires() -> RunConfig:
    """``cpu-robust`` continued at 352x352 px (PraNet's input size) from a trained model (``--init``).

    Small polyps are the shipped model's weakest stratum, and a 256 px input leaves a polyp under 1%
    of the frame a few dozen pixels. 20 epochs at a lower peak lr of 4e-4 (the weights are already
    trained; only the scale is new) and an EMA of 0.995, which follows about 4 epochs of 51 steps
    instead of 0.998's 10. About 1.9x the compute of 256 px per image, in training and inference.
    """
    config = _cpu_robust()
    train = config.train
    train.recipe, train.epochs, train.lr = "cpu-hires", 20, 4e-4
    train.image_size, train.ema_decay = 352, 0.995
    return config


# Recipes that continue a trained model and need --init.


def _adapt() -> RunConfig:
    """Adapt the shipped model to a small set of corrected images (a review folder), e.g. another
    centre's endoscope.

    For a few dozen images the ``cpu`` recipes' EMA (decay 0.998 over about 100 steps) would keep
    the saved weights mostly the initial ones, and 10% inner validation would be a handful of
    near-duplicate frames: here no EMA, the last epoch is kept, the heavy augmentations fight
    memorising, and ``polypseg train`` scales epochs, warm-up and learning rate to the set's size
    (:func:`polypseg.training.adapt.scale_to_set_size`).
    """
    train = TrainConfig(
        recipe="adapt",
        epochs=30,
        batch_size=8,
        optimizer="adamw",
        lr=3e-4,
        weight_decay=1e-4,
        schedule="onecycle",
        warmup_epochs=1,
        loss="dice_bce",
        augment=_heavy_augment(),
        val_fraction=0.0,
        ema_decay=0.0,
        init_from="kvasir-unet-r34",
        eval_batch_size=16,
    )
    return RunConfig(model=ModelConfig(), train=train)


RECIPES: dict[str, Any] = {
    "paper": _paper,
    "strong": _strong,
    "cpu": _cpu,
    "cpu-refine": _cpu_refine,
    "cpu-robust": _cpu_robust,
    "cpu-hires": _cpu_hires,
    "demo": _demo,
    "adapt": _adapt,
}


def get_recipe(name: str) -> RunConfig:
    """Return a fresh copy of a named recipe (one of :data:`RECIPES`)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}'; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]()
