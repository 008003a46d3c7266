"""Model and training configuration: its fields, overrides and validation (the named recipes: :mod:`polypseg.core.recipes`).

Every run saves its fully resolved configuration (``config.json``) so that it can be reproduced
and so that a checkpoint can be rebuilt without running code from the checkpoint itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from polypseg.core.rules import image_size_problem
from polypseg.errors import PolypsegError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The loss names a config may hold; polypseg.training.losses.LOSSES maps each to its function (a test checks
# that the two agree), so the config, below the models in the layers, needs no torch to validate.
LOSS_NAMES = ("dice", "bce", "dice_bce", "focal_dice", "tversky")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")


class ConfigError(PolypsegError, ValueError):
    """A configuration polypseg cannot run: unknown recipe, field, value or model.

    Also a ``ValueError``, which is what these errors were before, so callers catching that still do.
    """


@dataclass
class ModelConfig:
    """What to build: passed to :func:`polypseg.models.factory.create_model`."""

    arch: str = "unet"
    encoder: str = "resnet34"
    # "none" (random init), "imagenet" (smp's download/cache mechanism) or a path to a
    # torchvision-style ResNet state dict (.pth / .safetensors).
    encoder_weights: str = "none"
    skip_connections: bool = True
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    # U-Net / U-Net++ only: "scse" adds smp's spatial and channel squeeze-excitation after each
    # decoder block (Roy et al. 2018); "none" is the paper's plain decoder.
    decoder_attention: str = "none"
    in_channels: int = 3
    classes: int = 1


@dataclass
class AugmentConfig:
    """Batched augmentation, applied jointly to image and mask (see :mod:`polypseg.data.augment`)."""

    hflip: float = 0.5
    vflip: float = 0.5
    rotate_degrees: float = 30.0
    rotate_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    color_p: float = 0.5
    # Random resized crop: scale range of the area kept; 0 disables.
    crop_scale_min: float = 0.0
    crop_p: float = 0.0
    hue_saturation: float = 0.0
    # Shifts another centre's endoscope brings (all 0 = off): the image zoomed out into a black
    # border by up to `zoom_out_max` per side (smaller polyps), with probability `zoom_out_p`; per-channel
    # colour gains of +-`color_cast` and gamma exp(+-`gamma`) with the colour jitter; darkened corners
    # (vignetting) up to `vignette_strength`; up to three specular highlights; Gaussian blur up to
    # `blur_sigma` px; Gaussian sensor noise up to `noise_std`. Each has its own probability.
    zoom_out_max: float = 1.0
    zoom_out_p: float = 0.0
    color_cast: float = 0.0
    gamma: float = 0.0
    vignette_strength: float = 0.0
    vignette_p: float = 0.0
    specular_p: float = 0.0
    blur_sigma: float = 0.0
    blur_p: float = 0.0
    noise_std: float = 0.0
    noise_p: float = 0.0


# AugmentConfig fields added after configs were first saved, with their "off" default.
_LATER_AUGMENT_FIELDS: dict[str, Any] = {
    "zoom_out_max": 1.0,
    "zoom_out_p": 0.0,
    "color_cast": 0.0,
    "gamma": 0.0,
    "vignette_strength": 0.0,
    "vignette_p": 0.0,
    "specular_p": 0.0,
    "blur_sigma": 0.0,
    "blur_p": 0.0,
    "noise_std": 0.0,
    "noise_p": 0.0,
}


@dataclass
class TrainConfig:
    """How to train: one named recipe, optionally overridden field by field."""

    recipe: str = "paper"
    image_size: int = 256
    epochs: int = 30
    # The paper does not state a batch size; 16 is ours (fits every GPU and keeps 50 steps/epoch).
    batch_size: int = 16
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | onecycle
    warmup_epochs: float = 0.0
    loss: str = "dice"  # dice | dice_bce | bce | focal_dice | tversky
    # Progressive resizing: the first `progressive_epochs` epochs train on batches downsampled to
    # `progressive_size` px (about (size/image_size)^2 of the compute), the rest at image_size.
    # Validation and test are always at image_size. 0 disables.
    progressive_size: int = 0
    progressive_epochs: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Share of each fold's training part held out to pick the best epoch. The test fold is never
    # used for any choice. 0 keeps the last epoch.
    val_fraction: float = 0.1
    ema_decay: float = 0.0
    # auto | fp32 | bf16 (polypseg.core.precision): auto is bf16 autocast + channels-last on CUDA and on
    # CPUs with native bf16, fp32 elsewhere. Runs save the resolved value in config.json.
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    tta_flip: bool = False
    seed: int = 0
    # Fine-tuning: "none" starts from the model's own init (random, or --encoder-weights); else a
    # trained polypseg model (shipped name, checkpoint or single-model run folder) whose weights
    # the whole network starts from. Its weights file's SHA-256 is recorded in the run's best.json.
    init_from: str = "none"
    eval_batch_size: int = 32
    # Fine-tuning on a few images: BatchNorm layers stay in eval mode while training (their running
    # statistics frozen; their scale and shift still learn), so small, strongly augmented batches
    # cannot shift the statistics the model was trained with.
    freeze_norm: bool = False
    # Fine-tuning on a few images: the encoder keeps its weights and statistics; only the decoder
    # and the segmentation head learn (far fewer weights to fit to a handful of images).
    freeze_encoder: bool = False
    # Replay: `replay_images` image/mask pairs of the dataset at `replay_data` (drawn with `seed`)
    # join the training part, so fine-tuning on a few new images keeps seeing what the model knew.
    # Never used for validation or test. "none" / 0 is off.
    replay_data: str = "none"
    replay_images: int = 0


# TrainConfig fields added after configs were first saved, with their "unset" default.
_LATER_TRAIN_FIELDS: dict[str, Any] = {
    "init_from": "none",
    "freeze_norm": False,
    "freeze_encoder": False,
    "replay_data": "none",
    "replay_images": 0,
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Fields added later are written only when set, so every config saved before them (run
        # folders, checkpoints, docs/runs) still saves byte for byte as it was.
        for name, unset in _LATER_TRAIN_FIELDS.items():
            if data["train"].get(name) == unset:
                del data["train"][name]
        for name, unset in _LATER_AUGMENT_FIELDS.items():
            if data["train"]["augment"].get(name) == unset:
                del data["train"]["augment"][name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        model = _build(ModelConfig, data.get("model", {}))
        train_data = dict(data.get("train", {}))
        # Configs written before `precision` existed had `amp` (bf16 autocast on CUDA only).
        if "amp" in train_data:
            amp = train_data.pop("amp")
            train_data.setdefault("precision", "auto" if amp else "fp32")
        # Configs of early versions listed the threshold sweep, which is fixed (metrics.DEFAULT_THRESHOLDS).
        train_data.pop("thresholds", None)
        augment = _build(AugmentConfig, train_data.pop("augment", {}))
        train = _build(TrainConfig, train_data)
        train.augment = augment
        return cls(model=model, train=train)

    def save(self, path: Path) -> None:
        from polypseg.core.io_utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def config_differences(saved: RunConfig, given: RunConfig) -> list[str]:
    """The fields where ``given`` differs from ``saved``, as ``section.field: saved -> given`` lines."""

    def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
        return flat

    old, new = flatten(saved.to_dict()), flatten(given.to_dict())
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _build(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    values = {}
    for name, value in data.items():
        if isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


# Recipes that continue a trained model (train.init_from required; polypseg.core.recipes).
WARM_RESTART_RECIPES = ("cpu-refine", "cpu-robust", "cpu-hires")


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.field=value`` overrides (e.g. ``train.epochs=5``, ``model.skip_connections=false``).

    Values are parsed as JSON where possible (else kept as strings) and must fit the field's type:
    ``train.epochs=abc`` is a :class:`ConfigError` here, not a ``TypeError`` an hour into training.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        key, raw = item.split("=", 1)
        if key.strip() == "train.recipe":
            # The name stands for all of a recipe's fields (and the adapt recipe's sizing); renaming alone changes none.
            raise ConfigError(f"--set {item}: the recipe is chosen with --recipe, not --set")
        parts = key.strip().split(".")
        target: Any = config
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(target) or part not in {f.name for f in fields(target)}:
                raise ConfigError(f"override '{item}': no section '{part}'")
            target = getattr(target, part)
        name = parts[-1]
        if not dataclasses.is_dataclass(target) or name not in {f.name for f in fields(target)}:
            raise ConfigError(f"override '{item}': unknown field '{key}'")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        setattr(target, name, _typed_value(key, raw, value, getattr(target, name)))
    return config


def _typed_value(key: str, raw: str, value: Any, current: Any) -> Any:
    """``value`` (parsed from ``raw``) as the type of the field's ``current`` value, or a ConfigError."""

    def wrong(kind: str) -> ConfigError:
        return ConfigError(f"--set {key}={raw}: {key} takes {kind}")

    if dataclasses.is_dataclass(current):
        names = ", ".join(f.name for f in fields(current))
        raise ConfigError(f"--set {key}={raw}: {key} is a section; set its fields ({names})")
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if isinstance(current, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong("a whole number")
        return value
    if isinstance(current, float):
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise wrong("a finite number")
        return float(value)
    if isinstance(current, tuple):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise wrong("a list of whole numbers, e.g. [256,128,64,32,16]")
        return tuple(value)
    return value if isinstance(value, str) else raw.strip()


def _check_ranges(config: RunConfig, label: Any) -> None:
    """The numeric fields within the values training can use, else a ConfigError naming the field."""
    train, augment = config.train, config.train.augment
    checks: list[tuple[str, Any, bool, str]] = [
        ("train.epochs", train.epochs, train.epochs >= 1, ">= 1"),
        ("train.batch_size", train.batch_size, train.batch_size >= 1, ">= 1"),
        ("train.eval_batch_size", train.eval_batch_size, train.eval_batch_size >= 1, ">= 1"),
        # the encoder halves the input five times
        (
            "train.image_size",
            train.image_size,
            image_size_problem(train.image_size) is None,  # the rule checkpoints are read with too
            "a multiple of 32",
        ),
        (
            "train.progressive_size",
            train.progressive_size,
            train.progressive_size == 0 or (train.progressive_size >= 32 and train.progressive_size % 32 == 0),
            "0 (off) or a multiple of 32",
        ),
        (
            "train.progressive_epochs",
            train.progressive_epochs,
            0 <= train.progressive_epochs <= train.epochs,
            f"0 to train.epochs ({train.epochs})",
        ),
        ("train.lr", train.lr, train.lr > 0, "> 0"),
        ("train.weight_decay", train.weight_decay, train.weight_decay >= 0, ">= 0"),
        ("train.warmup_epochs", train.warmup_epochs, train.warmup_epochs >= 0, ">= 0"),
        ("train.replay_images", train.replay_images, train.replay_images >= 0, ">= 0 (0 is off)"),
        ("train.seed", train.seed, train.seed >= 0, ">= 0"),
        ("train.val_fraction", train.val_fraction, 0 <= train.val_fraction < 1, "0 <= v < 1"),
        ("train.ema_decay", train.ema_decay, 0 <= train.ema_decay < 1, "0 (off) <= d < 1"),
        ("train.augment.rotate_degrees", augment.rotate_degrees, augment.rotate_degrees >= 0, ">= 0"),
        ("train.augment.brightness", augment.brightness, augment.brightness >= 0, ">= 0"),
        ("train.augment.contrast", augment.contrast, augment.contrast >= 0, ">= 0"),
        ("train.augment.hue_saturation", augment.hue_saturation, augment.hue_saturation >= 0, ">= 0"),
        ("train.augment.crop_scale_min", augment.crop_scale_min, 0 <= augment.crop_scale_min <= 1, "0 to 1"),
        ("train.augment.zoom_out_max", augment.zoom_out_max, 1 <= augment.zoom_out_max <= 4, "1 (off) to 4"),
        ("train.augment.color_cast", augment.color_cast, 0 <= augment.color_cast < 1, "0 (off) <= v < 1"),
        ("train.augment.gamma", augment.gamma, 0 <= augment.gamma <= 2, "0 (off) to 2"),
        ("train.augment.vignette_strength", augment.vignette_strength, 0 <= augment.vignette_strength <= 1, "0 to 1"),
        ("train.augment.blur_sigma", augment.blur_sigma, 0 <= augment.blur_sigma <= 8, "0 (off) to 8 px"),
        ("train.augment.noise_std", augment.noise_std, 0 <= augment.noise_std <= 0.5, "0 (off) to 0.5"),
    ]
    for name in (
        "hflip",
        "vflip",
        "rotate_p",
        "color_p",
        "crop_p",
        "zoom_out_p",
        "vignette_p",
        "specular_p",
        "blur_p",
        "noise_p",
    ):
        p = getattr(augment, name)
        checks.append((f"train.augment.{name}", p, 0 <= p <= 1, "a probability, 0 to 1"))
    for field_name, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{label(field_name)} {value}: must be {rule}")


def validate_config(config: RunConfig, labels: Mapping[str, str] | None = None) -> RunConfig:
    """Check ``config`` before any work is done; raise :class:`ConfigError` naming the field at fault.

    Checks the choices of precision, loss, optimizer and schedule and that ``encoder_weights`` is
    ``none``, ``imagenet`` or an existing file. Whether the model can be built (architecture,
    encoder, reachable ImageNet weights) is :func:`polypseg.models.factory.check_model_config`'s job: the
    config knows no models. ``labels`` names fields the way the caller's user knows them (the CLI
    passes ``{"train.loss": "--loss", ...}``).
    """
    from polypseg.core.precision import PRECISIONS

    def label(field_name: str) -> str:
        return (labels or {}).get(field_name, field_name)

    train = config.train
    for field_name, value, choices in (
        ("train.precision", train.precision, PRECISIONS),
        ("train.loss", train.loss, LOSS_NAMES),
        ("train.optimizer", train.optimizer, OPTIMIZERS),
        ("train.schedule", train.schedule, SCHEDULES),
    ):
        if value not in choices:
            raise ConfigError(f"{label(field_name)} {value}: choose one of {', '.join(choices)}")
    _check_ranges(config, label)
    # Images are read as RGB and masks as one polyp/background channel: nothing else can be trained.
    for field_name, value, fixed, why in (
        ("model.in_channels", config.model.in_channels, 3, "images are read as RGB"),
        ("model.classes", config.model.classes, 1, "one polyp-vs-background output"),
    ):
        if value != fixed:
            raise ConfigError(f"{label(field_name)} {value}: must be {fixed} ({why})")
    weights = config.model.encoder_weights
    if weights not in ("none", "imagenet") and not Path(weights).is_file():
        raise ConfigError(f"{label('model.encoder_weights')} {weights}: not 'imagenet', 'none' or an existing file")
    if train.recipe in WARM_RESTART_RECIPES and train.init_from == "none":
        raise ConfigError(
            f"recipe {train.recipe} continues a trained model: pass {label('train.init_from')} MODEL "
            "(e.g. kvasir-unet-r34 or the best checkpoint of a --recipe cpu run)"
        )
    if train.init_from != "none" and weights != "none":
        raise ConfigError(
            f"{label('train.init_from')} and {label('model.encoder_weights')} both set the starting weights: give one"
        )
    _check_replay(train, label)
    return config


def _check_replay(train: TrainConfig, label: Any) -> None:
    """``replay_data`` is "none", a folder or a cache file (``.npz``), and is given exactly when
    ``replay_images`` asks for pairs; whether it holds usable pairs is the dataset rule's job."""
    data = Path(train.replay_data)
    if train.replay_data != "none" and not (data.is_dir() or (data.is_file() and data.suffix == ".npz")):
        raise ConfigError(
            f"{label('train.replay_data')} {train.replay_data}: not 'none', an existing dataset folder "
            "or a cache file (.npz)"
        )
    if train.replay_images > 0 and train.replay_data == "none":
        raise ConfigError(
            f"{label('train.replay_images')} {train.replay_images}: needs {label('train.replay_data')} "
            "(the dataset the replayed pairs come from)"
        )
    if train.replay_images == 0 and train.replay_data != "none":
        raise ConfigError(
            f"{label('train.replay_data')} {train.replay_data}: replays nothing without {label('train.replay_images')} "
            "(how many of its pairs join the training part)"
        )
