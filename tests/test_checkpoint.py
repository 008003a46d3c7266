"""Checkpoints are safetensors + JSON; loading never unpickles; training state round-trips."""

import json

import pytest
import torch

from polypseg.checkpoint import (
    CheckpointError,
    find_checkpoints,
    load_checkpoint,
    load_training_state,
    read_metadata,
    save_checkpoint,
    save_training_state,
)
from polypseg.config import RunConfig
from polypseg.models import create_model

from helpers import tiny_config


def test_round_trip_keeps_config_metrics_threshold(tmp_path):
    config = tiny_config()
    model = create_model(config.model).eval()
    save_checkpoint(tmp_path / "best", model, config, metrics={"val_dice": 0.7}, threshold=0.55)
    assert (tmp_path / "best.safetensors").is_file() and (tmp_path / "best.json").is_file()
    loaded = load_checkpoint(tmp_path / "best.json")
    assert loaded.threshold == 0.55
    assert loaded.metadata["metrics"]["val_dice"] == 0.7
    assert loaded.config.to_dict() == config.to_dict()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_weights_file_holds_no_pickle(tmp_path):
    config = tiny_config()
    save_checkpoint(tmp_path / "m", create_model(config.model), config)
    raw = (tmp_path / "m.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: JSON header + raw tensor bytes
    assert header["__metadata__"]["format"].startswith("polypseg")
    assert b"\x80\x04" not in raw[:2]


def test_foreign_or_incomplete_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "x.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a polypseg checkpoint"):
        read_metadata(tmp_path / "x")
    config = tiny_config()
    save_checkpoint(tmp_path / "m", create_model(config.model), config)
    (tmp_path / "m.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_checkpoint(tmp_path / "m")


def test_find_checkpoints_in_run_folder(tmp_path):
    config = tiny_config()
    model = create_model(config.model)
    for fold in (1, 0, 10, 2):
        save_checkpoint(tmp_path / f"fold_{fold}" / "best", model, config)
    found = find_checkpoints(tmp_path)
    assert [p.parent.name for p in found] == ["fold_0", "fold_1", "fold_2", "fold_10"]
    assert find_checkpoints(tmp_path / "fold_1") == [tmp_path / "fold_1" / "best.safetensors"]
    with pytest.raises(CheckpointError):
        find_checkpoints(tmp_path / "nothing")


def test_training_state_round_trip(tmp_path):
    config = tiny_config()
    model = create_model(config.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    optimizer.step()
    save_training_state(tmp_path / "state", model, optimizer, {"epoch": 3, "history": [{"epoch": 1}]})
    fresh = create_model(config.model)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    meta = load_training_state(tmp_path / "state", fresh, fresh_opt)
    assert meta["epoch"] == 3
    for a, b in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b)
    first = next(iter(optimizer.state.values()))
    restored = next(iter(fresh_opt.state.values()))
    torch.testing.assert_close(first["exp_avg"], restored["exp_avg"])
    assert float(first["step"]) == float(restored["step"])
