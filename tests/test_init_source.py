"""``--init``: the fine-tuning source is checked from its metadata alone, before any data is read."""

from __future__ import annotations

import pytest

from polypseg.core.config import ConfigError
from polypseg.models.checkpoint import save_checkpoint
from polypseg.models.factory import create_model
from polypseg.training.init_source import init_checkpoint

from helpers import tiny_config


@pytest.fixture(scope="module")
def two_fold_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("init") / "run"
    config = tiny_config(image_size=32)
    model = create_model(config.model).eval()
    for fold in (0, 1):
        save_checkpoint(run / f"fold_{fold}" / "best", model, config)
    return run


def _refine(source) -> object:
    config = tiny_config(image_size=32)
    config.train.init_from = str(source)
    return config


def test_one_checkpoint_of_the_same_architecture_is_named_without_building_a_model(two_fold_run, monkeypatch):
    from polypseg.models import factory

    def no_model(*args, **kwargs):
        raise AssertionError("checking --init built a model")

    monkeypatch.setattr(factory, "create_model", no_model)
    assert init_checkpoint(tiny_config()) is None  # init_from none
    assert init_checkpoint(_refine(two_fold_run / "fold_0" / "best")) == two_fold_run / "fold_0" / "best.safetensors"
    assert init_checkpoint(_refine(two_fold_run / "fold_1")) == two_fold_run / "fold_1" / "best.safetensors"


def test_another_architecture_a_cv_run_and_a_missing_source_are_refused_by_name(two_fold_run, tmp_path):
    other = _refine(two_fold_run / "fold_0" / "best")
    other.model.decoder_channels = (32, 16, 8, 8, 4)
    with pytest.raises(ConfigError, match=r"^--init .*fold_0/best: its model differs .* model\.decoder_channels"):
        init_checkpoint(other)
    with pytest.raises(ConfigError, match=r"^--init .*run: a run of 2 folds; name one fold"):
        init_checkpoint(_refine(two_fold_run))
    with pytest.raises(ConfigError, match=r"^--init .*nothing: no polypseg checkpoint found"):
        init_checkpoint(_refine(tmp_path / "nothing"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^--init .*broken: .*not valid JSON"):
        init_checkpoint(_refine(tmp_path / "broken"))


def test_training_at_another_size_than_the_init_model_is_said_in_one_line(two_fold_run, capsys):
    from polypseg.cli.options import say_init_size

    config = _refine(two_fold_run / "fold_0" / "best")  # trained at 32 px
    say_init_size(config)
    assert capsys.readouterr().err == ""
    config.train.image_size = 64
    say_init_size(config)
    note = capsys.readouterr().err
    assert note.startswith("note: --init ") and "trained at 32 px; this run trains at 64 px (--image-size 32" in note
    say_init_size(tiny_config())  # no --init: nothing to say
    assert capsys.readouterr().err == ""
