"""Checkpoints are safetensors + JSON; loading never unpickles; training state round-trips."""

import json

import pytest
import torch

from polypseg.models.checkpoint import (
    CheckpointError,
    find_checkpoints,
    load_checkpoint,
    load_training_state,
    read_metadata,
    save_checkpoint,
    save_checkpoint_tensors,
    save_training_state,
)
from polypseg.models.factory import available_models, create_model

from helpers import QUICK_ENCODER, tiny_config


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


@pytest.mark.parametrize("arch", available_models())
def test_every_architecture_loads_its_exact_tensors_with_nothing_left_unset(tmp_path, arch):
    """Loading builds the model on the meta device and takes the file's tensors: every parameter
    and buffer must hold them (none left on meta), in float32 even from a float16 file."""
    config = tiny_config()
    config.model.arch, config.model.encoder = arch, QUICK_ENCODER
    torch.manual_seed(0)
    model = create_model(config.model).eval()
    state = {
        name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in model.state_dict().items()
    }
    save_checkpoint_tensors(tmp_path / "best", state, config)
    loaded = load_checkpoint(tmp_path / "best").model
    tensors = dict(loaded.state_dict())
    assert not any(tensor.is_meta for tensor in (*loaded.parameters(), *loaded.buffers()))
    assert tensors.keys() == state.keys()
    for name, tensor in tensors.items():
        assert tensor.dtype == model.state_dict()[name].dtype, name
        torch.testing.assert_close(tensor, state[name].to(tensor.dtype), rtol=0, atol=0)
    assert all(p.requires_grad for p in loaded.parameters())


def test_a_buffer_the_file_does_not_hold_gets_its_constructors_value(tmp_path, monkeypatch):
    """A non-persistent buffer is not in the weights file, so the meta-device build cannot fill it:
    the model is then built for real, and the buffer keeps the value its constructor gives it."""
    import polypseg.models.factory as factory

    config = tiny_config()
    config.model.encoder = QUICK_ENCODER
    model = create_model(config.model).eval()
    save_checkpoint(tmp_path / "best", model, config)
    real_create = factory.create_model

    def with_buffer(*args, **kwargs):
        built = real_create(*args, **kwargs)
        built.register_buffer("scale", torch.full((1,), 2.0), persistent=False)
        return built

    monkeypatch.setattr(factory, "create_model", with_buffer)
    loaded = load_checkpoint(tmp_path / "best").model
    assert not loaded.scale.is_meta and loaded.scale.item() == 2.0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


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
    for a, b in zip(model.parameters(), fresh.parameters(), strict=False):
        torch.testing.assert_close(a, b)
    first = next(iter(optimizer.state.values()))
    restored = next(iter(fresh_opt.state.values()))
    torch.testing.assert_close(first["exp_avg"], restored["exp_avg"])
    assert float(first["step"]) == float(restored["step"])


def test_weights_file_describes_itself_and_old_pairs_still_load(tmp_path):
    """The sidecar is embedded in the weights file (one atomic unit); files of older versions, with
    the metadata in the .json only, load as before."""
    from safetensors.torch import load_file, save_file

    from polypseg.models.checkpoint import SIDECAR_KEY

    config = tiny_config()
    model = create_model(config.model).eval()
    save_checkpoint(tmp_path / "new", model, config, metrics={"val_dice": 0.3}, extra={"epoch": 4})
    raw = (tmp_path / "new.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert json.loads(header[SIDECAR_KEY])["epoch"] == 4
    (tmp_path / "new.json").write_text(json.dumps({**json.loads(header[SIDECAR_KEY]), "epoch": 1}))  # stale copy
    assert read_metadata(tmp_path / "new")["epoch"] == 4

    save_file(
        load_file(str(tmp_path / "new.safetensors")),
        str(tmp_path / "old.safetensors"),
        metadata={"format": "polypseg-checkpoint-v1"},
    )
    (tmp_path / "old.json").write_text(json.dumps({**json.loads(header[SIDECAR_KEY]), "epoch": 7}))
    old = load_checkpoint(tmp_path / "old")
    assert old.metadata["epoch"] == 7
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(old.model(x), model(x))


def test_changed_bytes_and_mismatched_shapes_are_named(tmp_path):
    config = tiny_config()
    save_checkpoint(tmp_path / "m", create_model(config.model), config)
    weights = tmp_path / "m.safetensors"
    stat = weights.stat()
    raw = bytearray(weights.read_bytes())
    raw[-8:] = bytes(8)
    weights.write_bytes(bytes(raw))
    import os

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(CheckpointError, match="SHA-256 recorded when it was written"):
        load_checkpoint(tmp_path / "m")

    other = tiny_config()
    other.model.decoder_channels = (32, 16, 16, 16, 16)
    save_checkpoint(tmp_path / "wide", create_model(other.model), other)
    sidecar = json.loads((tmp_path / "wide.json").read_text())
    sidecar["config"]["model"]["decoder_channels"] = list(config.model.decoder_channels)
    from safetensors.torch import load_file, save_file

    save_file(
        load_file(str(tmp_path / "wide.safetensors")),
        str(tmp_path / "wide.safetensors"),
        metadata={"format": "polypseg-checkpoint-v1"},
    )
    (tmp_path / "wide.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "wide")
    message = str(caught.value)
    assert "decoder.blocks.0.conv1.0.weight is (32, " in message and "in the model" in message and "\n" not in message


def test_content_key_follows_content_not_size_or_time(tmp_path):
    import os

    from polypseg.models.checkpoint import checkpoint_content_key

    config = tiny_config()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m", create_model(config.model), config)
    first = checkpoint_content_key(tmp_path / "m")
    assert checkpoint_content_key(tmp_path / "m.safetensors") == first
    weights = tmp_path / "m.safetensors"
    stat = weights.stat()
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "m", create_model(config.model), config)
    assert weights.stat().st_size == stat.st_size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert checkpoint_content_key(tmp_path / "m") != first


def test_stale_temporary_files_are_removed_live_ones_kept(tmp_path):
    import os

    from polypseg.core.io_utils import atomic_write_text, remove_stale_temps

    atomic_write_text(tmp_path / "a.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left by a write
    dead = tmp_path / ".best.safetensors.pid999999999.abcdefgh.tmp"
    legacy = tmp_path / ".history.json.k3j4h5g6.tmp"
    live = tmp_path / f".best.json.pid{os.getpid()}.abcdefgh.tmp"
    unrelated = tmp_path / ".notes.tmp"
    for path in (dead, legacy, live, unrelated):
        path.write_text("x")
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == sorted([dead.name, legacy.name])
    assert live.exists() and unrelated.exists()


def test_a_cv_run_offers_only_its_finished_folds(tmp_path):
    """A fold still training has a best checkpoint that is not its final one: an ensemble must not use it."""
    config = tiny_config()
    model = create_model(config.model)
    run = tmp_path / "run"
    for fold in (0, 1):
        save_checkpoint(run / f"fold_{fold}" / "best", model, config)
    config.train.epochs = 3
    (run / "config.json").write_text(json.dumps({"run": config.to_dict(), "kind": "cv", "data": "x"}))
    assert len(find_checkpoints(run)) == 2  # no histories: a copy made for deployment, every fold counts
    for fold, epochs in ((0, 1), (1, 1)):
        (run / f"fold_{fold}" / "history.json").write_text(json.dumps([{"epoch": e + 1} for e in range(epochs)]))
    with pytest.raises(CheckpointError, match=r"no fold has finished yet \(fold_0 is still training\)"):
        find_checkpoints(run)
    (run / "fold_0" / "history.json").write_text(json.dumps([{"epoch": e + 1} for e in range(3)]))
    assert find_checkpoints(run) == [run / "fold_0" / "best.safetensors"]
    assert find_checkpoints(run / "fold_1") == [run / "fold_1" / "best.safetensors"]  # by name: still usable
