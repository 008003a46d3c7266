"""Kill training between any two of its file writes, resume, and get the uninterrupted run's model.

Each interruption is an exception raised from ``os.replace`` (the last step of every atomic write)
at a chosen write: after it (the process dies between two writes) or instead of it (it dies
mid-write and leaves its temporary file, as ``kill -9`` would). The resumed run must end with the
same best weights and history as a run that was never interrupted, or refuse with a message that
says why; a silently different model fails the test. States written by older versions (two files,
no embedded record) must still resume, and one cut between its two files must be refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from polypseg.data.cache import build_cache
from polypseg.models.checkpoint import (
    STATE_FORMAT,
    CheckpointError,
    TrainingStateError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from polypseg.models.factory import create_model
from polypseg.training import loop as training
from polypseg.training.loop import train_model

from helpers import QUICK_ENCODER, tiny_config, write_synthetic_dataset

DEAD_PID = 999_999_999  # above any pid_max: a process that cannot be running


class Killed(BaseException):
    """Stands in for SIGKILL: a BaseException, so no ``except Exception`` in the code swallows it."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Several small steps on a loaded 2-core machine: one thread avoids oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("data"), n=8)
    cache = build_cache(root, 32, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    return cache.subset(cache.stems[:4]), cache.subset(cache.stems[4:])


def _config():
    config = tiny_config(epochs=3, image_size=32)
    config.model.encoder = QUICK_ENCODER  # dozens of trainings and saves stay quick
    config.train.ema_decay = 0.5
    config.train.lr = 3e-3
    config.train.precision = "fp32"
    return config


def _train(data, out: Path, **kwargs):
    train, val = data
    return train_model(_config(), train, val, out, device="cpu", progress=False, **kwargs)


def _outcome(run: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    best = load_checkpoint(run / "best")
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((run / "history.json").read_text())]
    assert best.metadata["epoch"] == max(history, key=lambda h: h["val_dice"])["epoch"]
    return best.model.state_dict(), history


def _assert_same(run: Path, reference: Path) -> None:
    weights, history = _outcome(run)
    ref_weights, ref_history = _outcome(reference)
    assert history == ref_history
    for key, value in ref_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run, and the list of files it wrote, in order."""
    out = tmp_path_factory.mktemp("reference") / "run"
    writes: list[str] = []
    real_replace = os.replace

    def recording(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if Path(dst).parent == out:
            writes.append(Path(dst).name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "STATE_EVERY_S", 0.0)
        patch.setattr(os, "replace", recording)
        _train(data, out)
    assert not list(out.glob("last_state.*")), "a finished run keeps no optimizer state"
    assert "last_state.safetensors" in writes and "best.json" in writes
    return out, writes


def _interrupt_at(data, out: Path, target: int, before: bool) -> None:
    """Run until write number ``target`` (0-based), then die after it or in the middle of it."""
    real_replace = os.replace
    count = {"n": 0}

    def failing(src, dst, *args, **kwargs):
        if Path(dst).parent != out:
            return real_replace(src, dst, *args, **kwargs)
        index = count["n"]
        count["n"] += 1
        if index == target and before:
            # die mid-write: the temporary file stays, as after kill -9
            shutil.copyfile(src, Path(src).with_name(f".{Path(dst).name}.pid{DEAD_PID}.abcd1234.tmp"))
            raise Killed
        real_replace(src, dst, *args, **kwargs)
        if index == target:
            raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "STATE_EVERY_S", 0.0)
        patch.setattr(os, "replace", failing)
        with pytest.raises(Killed):
            _train(data, out)


@pytest.mark.slow
def test_kill_between_any_two_writes_then_resume_gives_the_uninterrupted_model(data, reference, tmp_path):
    reference_run, writes = reference
    refused = []
    for target, name in enumerate(writes):
        # dying mid-write matters where a write is long: the weights files
        for before in (False, True) if name.endswith(".safetensors") else (False,):
            out = tmp_path / f"run-{target}-{'mid' if before else 'after'}"
            _interrupt_at(data, out, target, before)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(training, "STATE_EVERY_S", 0.0)
                try:
                    _train(data, out, resume=True)
                except CheckpointError as error:  # a refusal must say what is wrong and what to do
                    assert "delete" in str(error) and "\n" not in str(error), str(error)
                    refused.append((target, name, str(error)))
                    continue
            _assert_same(out, reference_run)
            assert not list(out.glob(".*.tmp")), f"stale temporary files after resuming ({name})"
            assert not list(out.glob("last_state.*")), f"the finished run kept its training state ({name})"
    # With one-file states nothing needs refusing: every interruption is recoverable.
    assert refused == []


def test_checkpoint_killed_between_its_two_files_reads_as_the_new_one(tmp_path, monkeypatch):
    config = tiny_config()
    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "best", create_model(config.model), config, metrics={"val_dice": 0.1}, extra={"epoch": 1}
    )
    torch.manual_seed(1)
    newer = create_model(config.model).eval()
    real_replace = os.replace

    def die_after_weights(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if Path(dst).suffix == ".safetensors":
            raise Killed

    monkeypatch.setattr(os, "replace", die_after_weights)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path / "best", newer, config, metrics={"val_dice": 0.2}, extra={"epoch": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 1  # the stale copy
    loaded = load_checkpoint(tmp_path / "best")
    assert loaded.metadata["epoch"] == 2 and read_metadata(tmp_path / "best")["metrics"] == {"val_dice": 0.2}
    for key, value in newer.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, msg=key)


# ---------------------------------------------------------------------------------------------
# States written by older polypseg (weights + JSON, nothing embedded)


def _make_legacy_state(run: Path, json_from: dict | None = None) -> None:
    """Rewrite ``run/last_state.*`` as polypseg <= 0.x wrote it: bare tensors, everything else in JSON."""
    weights = run / "last_state.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("best.")}
    record = json_from or json.loads((run / "last_state.json").read_text())
    legacy = {k: v for k, v in record.items() if k not in ("tensors_sha256", "global_step", "best")}
    save_file(tensors, str(weights), metadata={"format": STATE_FORMAT})
    (run / "last_state.json").write_text(json.dumps(legacy))


def _interrupt_after_epoch(data, out: Path, epoch: int) -> None:
    def stop(record):
        if record["epoch"] == epoch:
            raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "STATE_EVERY_S", 0.0)
        with pytest.raises(Killed):
            _train(data, out, on_epoch=stop)


def test_old_format_state_and_best_still_resume_to_the_same_model(data, reference, tmp_path):
    reference_run, _ = reference
    out = tmp_path / "old"
    _interrupt_after_epoch(data, out, 2)
    _make_legacy_state(out)
    # best.* as older versions wrote it too: no metadata in the weights file
    best = out / "best.safetensors"
    save_file(load_file(str(best)), str(best), metadata={"format": "polypseg-checkpoint-v1"})
    assert load_checkpoint(out / "best").metadata["epoch"] >= 1  # old checkpoints load from their .json
    _train(data, out, resume=True)
    _assert_same(out, reference_run)


def test_old_format_state_cut_between_its_two_files_is_refused(data, tmp_path):
    out = tmp_path / "cut"
    _interrupt_after_epoch(data, out, 1)
    record_epoch_1 = json.loads((out / "last_state.json").read_text())
    shutil.rmtree(out)
    _interrupt_after_epoch(data, out, 2)
    # the torn case: weights of the later epoch, record of the earlier one
    _make_legacy_state(out, json_from=record_epoch_1)
    with pytest.raises(
        TrainingStateError, match=r"inconsistent.*after 2 optimizer step.*epoch 1 \(1 steps of 1\).*delete .*last_state"
    ):
        _train(data, out, resume=True)


def test_corrupt_state_is_refused_not_resumed(data, tmp_path):
    out = tmp_path / "corrupt"
    _interrupt_after_epoch(data, out, 1)
    weights = out / "last_state.safetensors"
    stat = weights.stat()
    raw = bytearray(weights.read_bytes())
    raw[-64:] = os.urandom(64)  # tensor bytes changed, size and time restored
    weights.write_bytes(bytes(raw))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(TrainingStateError, match="SHA-256.*corrupt"):
        _train(data, out, resume=True)


# ---------------------------------------------------------------------------------------------
# Cross-validation runs: lean folders, stale temporary files, other data, wall time


def _cv(dataset: Path, out: Path, cache: Path, **kwargs):
    from polypseg.experiments.cv import run_cv

    config = _config()
    config.train.epochs = 1
    return run_cv(
        dataset,
        out,
        config,
        folds=2,
        device="cpu",
        progress=False,
        explain=False,
        report=False,
        cache_dir=cache,
        **kwargs,
    )


def test_cv_resume_cleans_up_refuses_other_data_and_sums_wall_time(tmp_path):
    from polypseg.experiments.cv import RunError

    dataset = write_synthetic_dataset(tmp_path / "data", n=8)
    run, cache = tmp_path / "run", tmp_path / "cache"
    first = _cv(dataset, run, cache, only_folds=[0])
    assert not list(run.rglob("last_state.*")), "a finished fold keeps no optimizer state"
    # as an older polypseg left a finished fold: its training state kept, plus temporary files of kills
    (run / "fold_0" / "last_state.safetensors").write_bytes(b"x" * 1000)
    (run / "fold_0" / "last_state.json").write_text("{}")
    stale = [
        run / "fold_0" / f".last_state.safetensors.pid{DEAD_PID}.abcd1234.tmp",
        run / "fold_0" / ".best.safetensors.q1w2e3r4.tmp",  # named as before pids were recorded
        run / f".summary.json.pid{DEAD_PID}.zzzz9999.tmp",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    alive = run / f".summary.json.pid{os.getpid()}.live0000.tmp"  # a live process's write: kept
    alive.write_bytes(b"in progress")

    other = write_synthetic_dataset(tmp_path / "other", n=8, seed=1)
    with pytest.raises(RunError, match=r"data: '.*data' -> '.*other'"):
        _cv(other, run, cache, resume=True)
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)  # the same data elsewhere (e.g. another machine) is accepted

    resumed = _cv(copy, run, cache, resume=True)
    assert resumed.folds == 2
    assert not any(path.exists() for path in stale) and alive.exists()
    assert not list(run.rglob("last_state.*"))
    invocations = json.loads((run / "invocations.json").read_text())["invocations"]
    assert len(invocations) == 2 and all(entry["seconds"] > 0 for entry in invocations)
    for entry in invocations:  # what ran each invocation: a long run spans several
        assert "cores)" in entry["machine"] and entry["precision"] in ("fp32", "bf16") and entry["polypseg_version"]
    assert resumed.wall_time_s == pytest.approx(sum(e["seconds"] for e in invocations), abs=0.11)
    assert resumed.wall_time_s > resumed.last_invocation_s > 0
    assert first.wall_time_s == pytest.approx(invocations[0]["seconds"], abs=0.11)


def test_keep_state_on_request(data, tmp_path, monkeypatch):
    monkeypatch.setenv("POLYPSEG_KEEP_TRAINING_STATE", "1")
    _train(data, tmp_path / "kept")
    assert (tmp_path / "kept" / "last_state.safetensors").is_file()
    monkeypatch.delenv("POLYPSEG_KEEP_TRAINING_STATE")
    _train(data, tmp_path / "lean")
    assert not (tmp_path / "lean" / "last_state.safetensors").exists()


@pytest.mark.slow
def test_two_resumes_keep_the_best_weights_of_a_state_saved_at_its_best_epoch(data, tmp_path):
    """Resumed from a state saved at its own best epoch, later states must still carry those weights.

    Scripted validation Dice 0.5, 0.6, 0.4, 0.7, 0.3: stop after epoch 2 (the best so far, so its
    state holds no separate copy of the best weights), resume, train epoch 3 (state saved, best is
    still epoch 2), then die right after epoch 4 wrote the new best.* and before its state. The
    second resume must put best.* back to epoch 2 from the state and end as the uninterrupted run.
    """
    train, val = data
    script = {1: 0.5, 2: 0.6, 3: 0.4, 4: 0.7, 5: 0.3}
    epoch = {"n": 0}

    def scripted(*args, **kwargs):
        epoch["n"] += 1
        return {"val_dice": script[epoch["n"]], "val_loss": 0.0}

    def run(out: Path, start: int, **kwargs) -> None:
        config = _config()
        config.train.epochs = 5
        epoch["n"] = start
        train_model(config, train, val, out, device="cpu", progress=False, **kwargs)

    real_save = training.save_training_state

    def dies_before_state_of_epoch_4(path, model, optimizer, meta, **kwargs):
        if meta["epoch"] == 4:
            raise Killed
        return real_save(path, model, optimizer, meta, **kwargs)

    def stop_after_epoch_2(record):
        if record["epoch"] == 2:
            raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "STATE_EVERY_S", -1.0)
        patch.setattr(training, "_validate", scripted)
        run(tmp_path / "reference", 0)
        with pytest.raises(Killed):
            run(tmp_path / "run", 0, on_epoch=stop_after_epoch_2)
        patch.setattr(training, "save_training_state", dies_before_state_of_epoch_4)
        with pytest.raises(Killed):
            run(tmp_path / "run", 2, resume=True)
        assert read_metadata(tmp_path / "run" / "best")["epoch"] == 4  # written before the state
        patch.setattr(training, "save_training_state", real_save)
        run(tmp_path / "run", 3, resume=True)
    _assert_same(tmp_path / "run", tmp_path / "reference")


# ---------------------------------------------------------------------------------------------
# Chained kills across the folds of a cross-validation run


def _cv_resume_config():
    """Several optimizer steps an epoch, EMA, progressive resizing, and bf16: channels-last weights
    with fused Adam, the layout a restored optimizer state must match (it runs on any CPU)."""
    config = _config()
    config.train.epochs = 3
    config.train.image_size = 64
    config.train.progressive_size = 32
    config.train.progressive_epochs = 1
    config.train.batch_size = 2
    config.train.val_fraction = 0.34
    config.train.precision = "bf16"
    return config


def _cv_invocation(dataset: Path, run: Path, cache: Path, kill: tuple[str, int, bool] | None, resume: bool) -> None:
    """One ``cv`` invocation; ``kill=(file, n, mid_write)`` dies at the n-th write (1-based) of
    ``run/file`` in this invocation, after it or in the middle of it, as ``kill -9`` would."""
    from polypseg.experiments.cv import run_cv

    real_replace = os.replace
    seen: dict[str, int] = {}

    def failing(src, dst, *args, **kwargs):
        name = Path(dst).relative_to(run).as_posix() if Path(dst).is_relative_to(run) else ""
        seen[name] = seen.get(name, 0) + 1
        if kill is not None and (name, seen[name]) == kill[:2]:
            if kill[2]:
                shutil.copyfile(src, Path(src).with_name(f".{Path(dst).name}.pid{DEAD_PID}.abcd1234.tmp"))
                raise Killed
            real_replace(src, dst, *args, **kwargs)
            raise Killed
        return real_replace(src, dst, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "STATE_EVERY_S", 0.0)
        patch.setattr(os, "replace", failing)
        call = dict(folds=2, device="cpu", progress=False, explain=False, report=False, cache_dir=cache)
        if kill is None:
            run_cv(dataset, run, _cv_resume_config(), resume=resume, **call)
        else:
            with pytest.raises(Killed):
                run_cv(dataset, run, _cv_resume_config(), resume=resume, **call)
    assert kill is None or seen.get(kill[0], 0) >= kill[1], f"{kill} never happened: the kill plan is stale"


@pytest.mark.slow
def test_cv_killed_four_times_across_folds_resumes_to_the_uninterrupted_histories_and_weights(tmp_path):
    dataset = write_synthetic_dataset(tmp_path / "data", n=12)
    cache = tmp_path / "cache"
    _cv_invocation(dataset, tmp_path / "reference", cache, None, resume=False)
    run = tmp_path / "run"
    kills = [
        ("fold_0/last_state.safetensors", 1, False),  # the state's weights written, its .json copy not yet
        ("fold_1/last_state.safetensors", 1, True),  # mid-write of fold 1's first state
        ("fold_1/history.json", 2, False),  # an epoch recorded after the last saved state
        ("summary.json", 1, False),  # while summarising
    ]
    for number, kill in enumerate(kills):
        _cv_invocation(dataset, run, cache, kill, resume=number > 0)
    _cv_invocation(dataset, run, cache, None, resume=True)
    for fold in ("fold_0", "fold_1"):
        history = json.loads((run / fold / "history.json").read_text())
        assert len(history) == 3 and all("val_dice" in h for h in history)
        _assert_same(run / fold, tmp_path / "reference" / fold)
    assert not list(run.rglob("last_state.*")) and not list(run.rglob(".*.tmp"))


def test_restored_optimizer_state_steps_channels_last_weights_as_the_uninterrupted_one(tmp_path):
    """Fused Adam walks a weight and its moments as flat memory: restored moments must keep the
    weight's channels-last layout (bf16 training on a CPU), or each update uses other elements'."""

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)

    def step(model, optimizer, seed):
        torch.manual_seed(seed)
        optimizer.zero_grad()
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        optimizer.step()

    model, optimizer = model_and_optimizer()
    step(model, optimizer, 1)
    training.save_training_state(tmp_path / "state", model, optimizer, {"epoch": 1, "global_step": 1})
    step(model, optimizer, 2)
    resumed, resumed_optimizer = model_and_optimizer()
    training.load_training_state(tmp_path / "state", resumed, resumed_optimizer, steps_per_epoch=1)
    step(resumed, resumed_optimizer, 2)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
