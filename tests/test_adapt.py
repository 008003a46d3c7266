"""The ``adapt`` recipe: sized to the corrected set, no EMA, and a result ``serve`` loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from polypseg.core.config import ConfigError, validate_config
from polypseg.core.recipes import get_recipe
from polypseg.training.adapt import MAX_EPOCHS, MIN_EPOCHS, TARGET_STEPS, plan_for, scale_to_set_size

from helpers import TINY_MODEL, write_synthetic_dataset


def test_the_recipe_fine_tunes_the_shipped_model_without_ema_or_inner_validation():
    config = validate_config(get_recipe("adapt"))
    train = config.train
    assert train.init_from == "kvasir-unet-r34" and train.ema_decay == 0 and train.val_fraction == 0
    assert train.augment.crop_p > 0 and train.augment.hue_saturation > 0  # the heavy augmentations
    assert config.model.encoder == "resnet34"


@pytest.mark.parametrize("images", [12, 31, 55, 273, 1000, 5000])
def test_plan_aims_at_a_fixed_number_of_steps(images: int):
    config = get_recipe("adapt")
    plan = plan_for(config, images)
    steps_per_epoch = max(1, images // config.train.batch_size)
    assert MIN_EPOCHS <= plan.epochs <= MAX_EPOCHS and plan.steps == plan.epochs * steps_per_epoch
    if MIN_EPOCHS < plan.epochs < MAX_EPOCHS:
        assert TARGET_STEPS <= plan.steps < TARGET_STEPS + steps_per_epoch
    assert 0 < plan.warmup_epochs <= plan.epochs / 4
    assert config.train.lr / 2 <= plan.lr <= config.train.lr
    assert (plan.lr < config.train.lr) == (images < 100)  # the smallest sets take smaller steps


def test_explicit_choices_are_kept():
    config = get_recipe("adapt")
    config.train.epochs, config.train.lr = 5, 1e-3
    plan = scale_to_set_size(config, 40, keep_epochs=True, keep_lr=True)
    assert (config.train.epochs, config.train.lr, plan.epochs) == (5, 1e-3, 5)


def test_train_command_sizes_the_recipe_to_the_training_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from polypseg.cli.main import app
    from polypseg.training import train_split

    seen = []
    monkeypatch.setattr(train_split, "train_single_split", lambda data, out, config, **kw: seen.append(config) or {
        "checkpoint": str(out), "best_epoch": 0})  # fmt: skip
    data = write_synthetic_dataset(tmp_path / "review", n=20)
    (tmp_path / "held.txt").write_text("case00\ncase01\ncase02\ncase03\n")
    runner = CliRunner()
    base = ["train", "--data", str(data), "--recipe", "adapt", "--test-list", str(tmp_path / "held.txt")]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    expected = plan_for(get_recipe("adapt"), 16)
    assert "adapt: 16 training images" in result.output
    assert (seen[-1].train.epochs, seen[-1].train.lr) == (expected.epochs, pytest.approx(expected.lr))
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--epochs", "3", "--set", "train.lr=0.001"])
    assert result.exit_code == 0, result.output
    assert (seen[-1].train.epochs, seen[-1].train.lr) == (3, 0.001)


def test_the_recipe_trains_at_the_input_size_of_the_model_it_starts_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from polypseg.cli.main import app
    from polypseg.models.checkpoint import save_checkpoint
    from polypseg.models.factory import create_model
    from polypseg.training import train_split

    source = get_recipe("adapt")
    source.model.encoder, source.model.decoder_channels = TINY_MODEL["encoder"], TINY_MODEL["decoder_channels"]
    source.train.image_size, source.train.init_from = 96, "none"
    init = save_checkpoint(tmp_path / "source" / "best", create_model(source.model), source)
    seen = []
    monkeypatch.setattr(train_split, "train_single_split", lambda data, out, config, **kw: seen.append(config) or {
        "checkpoint": str(out), "best_epoch": 0})  # fmt: skip
    data = write_synthetic_dataset(tmp_path / "review", n=12)
    model = ["--set", f"model.encoder={TINY_MODEL['encoder']}"]
    model += ["--set", f"model.decoder_channels={list(TINY_MODEL['decoder_channels'])}"]
    base = ["train", "--data", str(data), "--recipe", "adapt", "--init", str(init), *model]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert seen[-1].train.image_size == 96 and "training at 96 px" in result.output
    result = CliRunner().invoke(app, [*base, "--image-size", "32", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert seen[-1].train.image_size == 32 and "training at" not in result.output


def test_replayed_pairs_count_in_the_training_set_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from polypseg.cli.main import app
    from polypseg.training import train_split
    from polypseg.training.adapt import training_set_size

    seen = []
    monkeypatch.setattr(train_split, "train_single_split", lambda data, out, config, **kw: seen.append(config) or {
        "checkpoint": str(out), "best_epoch": 0})  # fmt: skip
    data = write_synthetic_dataset(tmp_path / "review", n=20)
    replay = write_synthetic_dataset(tmp_path / "kvasir", n=40, seed=1)
    config = get_recipe("adapt")
    config.train.replay_data, config.train.replay_images = str(replay), 30
    assert training_set_size(data, config) == 20 + 30
    base = ["train", "--data", str(data), "--recipe", "adapt", "--set", f"train.replay_data={replay}"]
    result = CliRunner().invoke(app, [*base, "--set", "train.replay_images=30", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    expected = plan_for(get_recipe("adapt"), 50)
    assert "adapt: 50 training images" in result.output and "replay: 30 pairs of" in result.output
    assert (seen[-1].train.epochs, seen[-1].train.lr) == (expected.epochs, pytest.approx(expected.lr))
    assert seen[-1].train.replay_images == 30
    result = CliRunner().invoke(app, ["cv", *base[1:], "--set", "train.replay_images=30", "--out", str(tmp_path / "b")])
    assert isinstance(result.exception, ConfigError) and "train.replay_images: replay is for" in str(result.exception)
    assert not (tmp_path / "b").exists()  # refused by run_cv's check, the rule library callers meet too


def test_the_start_command_plus_resume_rebuilds_the_sized_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The rebuilt recipe was not sized, so the resume was refused ("train.lr: 0.00015 -> 0.0003")."""
    from polypseg.cli.main import app
    from polypseg.training import train_split

    seen = []
    monkeypatch.setattr(train_split, "train_single_split", lambda data, out, config, **kw: seen.append(config) or {
        "checkpoint": str(out), "best_epoch": 0})  # fmt: skip
    data = write_synthetic_dataset(tmp_path / "review", n=20)
    start = ["train", "--data", str(data), "--recipe", "adapt", "--out", str(tmp_path / "a")]
    assert CliRunner().invoke(app, start).exit_code == 0
    seen[0].save(tmp_path / "a" / "config.json")  # what the real start saves
    result = CliRunner().invoke(app, [*start, "--resume"])
    assert result.exit_code == 0, result.output
    assert seen[1] == seen[0] and seen[0].train.lr < get_recipe("adapt").train.lr


def test_serve_loads_an_adapted_model(tmp_path: Path):
    from polypseg.models.checkpoint import save_checkpoint
    from polypseg.models.factory import create_model
    from polypseg.web.app import WebSettings, create_app
    from polypseg.web.service import InferenceService

    config = get_recipe("adapt")
    config.model.encoder, config.model.decoder_channels = TINY_MODEL["encoder"], TINY_MODEL["decoder_channels"]
    config.train.image_size = 32
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "adapted" / "best", create_model(config.model), config)
    service = InferenceService.from_checkpoint(path.with_suffix(""), device="cpu")
    with TestClient(create_app(service, WebSettings())) as client:
        assert client.get("/v1/model").json()["training"]["recipe"] == "adapt"


def _script(name: str):
    """A module of ``scripts/`` (measurement scripts, not part of the package), loaded by path."""
    import importlib.util
    import sys

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(scripts))


def test_cvc_splits_keep_sequences_apart_and_the_selection_split_inside_the_corrected_part():
    splits = _script("adapt_experiment").splits([str(n) for n in (3, 60, 150, 151, 152, 297, 298, 400, 612)])
    corrected, held_out = splits["by_sequence"]
    assert corrected == ["3", "60", "150", "151", "152", "297"] and held_out == ["298", "400", "612"]
    chosen, checked = splits["select"]
    assert chosen == ["3", "60", "150", "151"] and checked == ["152", "297"]  # sequences 1-7, then 8-14
    assert sorted(splits["random"][0] + splits["random"][1], key=int) == corrected + held_out
    assert splits["by_sequence_reverse"] == (held_out, corrected)  # the other direction: every frame held out once


def test_pooled_folds_know_cvc_sequences_and_resample_them_whole():
    pooled = _script("adapt_pooled")
    assert [pooled.sequence_of(n) for n in ("1", "25", "26", "297", "298", "591", "592", "612")] == [
        1, 1, 2, 14, 15, 28, 29, 29,
    ]  # fmt: skip
    assert pooled.sequence_bootstrap({"1": 0.02, "30": 0.02, "300": 0.02}) == pytest.approx((0.02, 0.02))
    # one sequence of three frames that all gained, one of one frame that lost: each resample holds
    # whole sequences, so the mean is 0.1, (3 * 0.1 - 0.2) / 4 = 0.025 or -0.2, never a frame-level mix
    low, high = pooled.sequence_bootstrap({"1": 0.1, "2": 0.1, "3": 0.1, "300": -0.2}, resamples=2000)
    assert (low, high) == pytest.approx((-0.2, 0.1))


def test_weight_average_interpolates_floating_tensors_and_keeps_counters():
    average = _script("adapt_weight_average").averaged_state
    start = {"w": torch.zeros(3), "n": torch.tensor(5)}
    tuned = {"w": torch.full((3,), 2.0), "n": torch.tensor(9)}
    mixed = average(start, tuned, 0.25)
    assert torch.equal(mixed["w"], torch.full((3,), 0.5)) and int(mixed["n"]) == 9
    assert torch.equal(average(start, tuned, 0.0)["w"], start["w"])
    assert torch.equal(average(start, tuned, 1.0)["w"], tuned["w"])
