"""Configuration: migration of old configs, validation for every caller, user errors."""

from __future__ import annotations

import pytest

from polypseg.core.config import WARM_RESTART_RECIPES, ConfigError, RunConfig, apply_overrides, validate_config
from polypseg.core.recipes import RECIPES, get_recipe
from polypseg.errors import PolypsegError


def test_old_train_sections_migrate() -> None:
    """``amp`` became ``precision``; ``thresholds`` (the fixed sweep, once listed in configs) is dropped."""
    old = {k: v for k, v in get_recipe("paper").to_dict()["train"].items() if k != "precision"}
    config = RunConfig.from_dict({"train": {**old, "amp": True, "thresholds": [0.3, 0.5, 0.7]}})
    assert config.train.precision == "auto" and "thresholds" not in config.to_dict()["train"]
    assert RunConfig.from_dict({"train": {"amp": False}}).train.precision == "fp32"


def test_config_errors_are_user_errors_and_still_value_errors() -> None:
    with pytest.raises(ConfigError, match="unknown recipe") as info:
        get_recipe("nope")
    assert isinstance(info.value, PolypsegError) and isinstance(info.value, ValueError)
    config = get_recipe("demo")
    config.train.loss = "l7"
    with pytest.raises(ConfigError, match=r"^train\.loss l7: choose one of"):
        validate_config(config)
    with pytest.raises(ConfigError, match=r"^--loss l7"):
        validate_config(config, labels={"train.loss": "--loss"})
    config = get_recipe("demo")
    config.train.schedule = "linear"
    with pytest.raises(ConfigError, match="train.schedule linear"):
        validate_config(config)
    config = get_recipe("demo")
    config.model.encoder_weights = "/no/such/weights.pth"
    with pytest.raises(ConfigError, match="not 'imagenet', 'none' or an existing file"):
        validate_config(config)
    config = get_recipe("demo")
    config.model.arch = "transunet"
    validate_config(config)  # the config knows no models: building one is models' check
    from polypseg.models.factory import check_model_config

    with pytest.raises(ConfigError, match="invalid model settings: unknown architecture 'transunet'"):
        check_model_config(config.model)


@pytest.mark.parametrize("recipe", ["cpu-refine", "cpu-robust", "cpu-hires"])
def test_warm_restart_recipes_need_init(recipe: str) -> None:
    config = get_recipe(recipe)
    with pytest.raises(ConfigError, match=f"{recipe} continues a trained model: pass --init"):
        validate_config(config, labels={"train.init_from": "--init"})


def test_cpu_robust_adds_cross_centre_augmentations_to_cpu_refine() -> None:
    robust, refine = get_recipe("cpu-robust"), get_recipe("cpu-refine")
    assert robust.model == refine.model
    assert (robust.train.val_fraction, robust.train.seed) == (refine.train.val_fraction, refine.train.seed)
    augment = robust.train.augment
    assert augment.zoom_out_p > 0 and augment.blur_p > 0 and augment.noise_p > 0 and augment.specular_p > 0
    saved = robust.to_dict()["train"]["augment"]
    assert saved["zoom_out_max"] == augment.zoom_out_max and "gamma" in saved
    assert RunConfig.from_dict(robust.to_dict()) == robust


def test_cpu_hires_is_cpu_robust_at_352_px() -> None:
    hires, robust = get_recipe("cpu-hires"), get_recipe("cpu-robust")
    assert (hires.train.image_size, robust.train.image_size) == (352, 256)
    assert hires.train.augment == robust.train.augment and hires.model == robust.model
    assert hires.train.lr < robust.train.lr and hires.train.ema_decay < robust.train.ema_decay
    assert hires.train.val_fraction == robust.train.val_fraction and hires.train.seed == robust.train.seed
    hires.train.init_from = "kvasir-unet-r34"
    validate_config(hires)


def test_cpu_refine_needs_init_and_init_excludes_encoder_weights() -> None:
    refine = get_recipe("cpu-refine")
    with pytest.raises(ConfigError, match="cpu-refine continues a trained model: pass --init"):
        validate_config(refine, labels={"train.init_from": "--init"})
    refine.train.init_from = "kvasir-unet-r34"
    validate_config(refine)
    assert (refine.train.epochs, refine.train.progressive_epochs) == (30, 0)
    assert refine.train.lr < get_recipe("cpu").train.lr
    refine.model.encoder_weights = "imagenet"
    with pytest.raises(ConfigError, match="both set the starting weights"):
        validate_config(refine)


def test_init_from_is_saved_only_when_set_and_round_trips() -> None:
    """Configs saved before ``init_from`` existed must save byte for byte as they were."""
    plain = get_recipe("cpu")
    assert "init_from" not in plain.to_dict()["train"]
    assert RunConfig.from_dict(plain.to_dict()).train.init_from == "none"
    assert not {"zoom_out_max", "blur_p", "noise_std"} & set(plain.to_dict()["train"]["augment"])
    refine = get_recipe("cpu-refine")
    refine.train.init_from = "runs/stage1/best"
    assert refine.to_dict()["train"]["init_from"] == "runs/stage1/best"
    assert RunConfig.from_dict(refine.to_dict()) == refine


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=abc", r"train\.epochs takes a whole number"),
        ("train.epochs=2.5", r"train\.epochs takes a whole number"),
        ("train.lr=NaN", r"train\.lr takes a finite number"),
        ("train.channels_last=1", r"takes true or false"),
        ("model.decoder_channels=[16,x]", r"a list of whole numbers"),
        ("train=3", r"train is a section; set its fields \(recipe, image_size"),
        ("train.augment=0.5", r"train\.augment is a section"),
        ("nope.epochs=3", r"no section 'nope'"),
        ("train.epochs.x=3", r"unknown field 'train\.epochs\.x'"),
    ],
)
def test_overrides_must_fit_the_fields_type(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_recipe("demo"), [override])


def test_overrides_are_converted_to_the_fields_type() -> None:
    config = apply_overrides(
        get_recipe("demo"),
        ["train.lr=1", "train.epochs=3.0", "model.decoder_channels=[16,16,16,16,16]", "model.encoder=123"],
    )
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)
    assert config.model.decoder_channels == (16, 16, 16, 16, 16)
    assert config.model.encoder == "123"  # a string field keeps the text as given


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=-1", r"^train\.epochs -1: must be >= 1"),
        ("train.batch_size=0", r"^train\.batch_size 0: must be >= 1"),
        ("train.image_size=48", r"^train\.image_size 48: must be a multiple of 32"),
        ("train.lr=0", r"^train\.lr 0\.0: must be > 0"),
        ("train.ema_decay=1", r"^train\.ema_decay 1\.0: must be 0 \(off\) <= d < 1"),
        ("train.val_fraction=1", r"^train\.val_fraction"),
        ("train.augment.hflip=1.5", r"^train\.augment\.hflip 1\.5: must be a probability"),
        ("train.augment.blur_p=2", r"^train\.augment\.blur_p 2\.0: must be a probability"),
        ("train.augment.zoom_out_max=0.5", r"^train\.augment\.zoom_out_max 0\.5: must be 1 \(off\) to 4"),
        ("train.augment.noise_std=-0.1", r"^train\.augment\.noise_std -0\.1: must be 0 \(off\) to 0\.5"),
        ("train.progressive_epochs=99", r"^train\.progressive_epochs 99: must be 0 to train\.epochs"),
    ],
)
def test_numbers_out_of_range_name_their_field(override: str, message: str) -> None:
    config = apply_overrides(get_recipe("demo"), [override])
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_every_recipe_passes_validation() -> None:
    for name in RECIPES:
        config = get_recipe(name)
        if name in WARM_RESTART_RECIPES:
            config.train.init_from = "a-trained-model"
        validate_config(config)


def test_replay_is_saved_only_when_set_and_round_trips(tmp_path) -> None:
    """Configs saved before replay existed save byte for byte as they were; ``--set`` takes both fields."""
    for name in RECIPES:
        assert not {"replay_data", "replay_images"} & set(get_recipe(name).to_dict()["train"]), name
    config = apply_overrides(get_recipe("adapt"), [f"train.replay_data={tmp_path}", "train.replay_images=96"])
    assert (config.train.replay_data, config.train.replay_images) == (str(tmp_path), 96)
    saved = config.to_dict()["train"]
    assert (saved["replay_data"], saved["replay_images"]) == (str(tmp_path), 96)
    assert RunConfig.from_dict(config.to_dict()) == config
    validate_config(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.replay_images=-1"], r"^train\.replay_images -1: must be >= 0"),
        (["train.replay_images=4"], r"^train\.replay_images 4: needs train\.replay_data"),
        (["train.replay_data=no/such/folder", "train.replay_images=4"], r"^train\.replay_data no/such/folder: not"),
        (["train.replay_data=FILE"], r"^train\.replay_data .*notes\.txt: not 'none', an existing dataset folder"),
        (["train.replay_data=DIR"], r"^train\.replay_data .*: replays nothing without train\.replay_images"),
        (["train.seed=-1"], r"^train\.seed -1: must be >= 0"),
    ],
)
def test_replay_settings_name_their_field(tmp_path, overrides: list[str], message: str) -> None:
    (tmp_path / "notes.txt").write_text("not a dataset")
    overrides = [o.replace("FILE", str(tmp_path / "notes.txt")).replace("DIR", str(tmp_path)) for o in overrides]
    config = apply_overrides(get_recipe("demo"), overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


@pytest.mark.parametrize("name", ["bogus", "adapt"])
def test_the_recipe_is_not_a_set_field(name: str) -> None:
    """--set train.recipe=bogus was saved as is, and =adapt switched on adapt's sizing without its fields."""
    with pytest.raises(ConfigError, match=rf"^--set train\.recipe={name}: the recipe is chosen with --recipe"):
        apply_overrides(get_recipe("demo"), [f"train.recipe={name}"])
