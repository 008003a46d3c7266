"""Training on tiny data: learns, writes checkpoints, resumes exactly where it stopped."""

import json

import pytest
import torch

from polypseg.core.config import ConfigError, TrainConfig
from polypseg.data.cache import build_cache
from polypseg.models.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from polypseg.models.factory import create_model
from polypseg.training import loop as training
from polypseg.training.loop import lr_factor, train_model
from polypseg.training.losses import LOSSES, create_loss

from helpers import QUICK_ENCODER, tiny_config, write_synthetic_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("data"), n=12)
    return build_cache(root, 32, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_schedules():
    config = TrainConfig(schedule="onecycle", warmup_epochs=1)
    assert lr_factor(config, 0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(config, 9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(config, 10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(config, 99, 100, 10) < 0.01
    assert lr_factor(TrainConfig(schedule="constant"), 50, 100, 10) == 1.0
    cosine = TrainConfig(schedule="cosine")
    assert lr_factor(cosine, 50, 100, 10) == pytest.approx(0.5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_low_for_right_answer(name):
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    loss = create_loss(name)
    good = loss(target * 20 - 10, target)
    bad = loss(10 - target * 20, target)
    assert torch.isfinite(good) and good < bad


@pytest.mark.slow
def test_train_writes_best_history_and_learns(tiny_data, tmp_path):
    config = tiny_config(epochs=3, image_size=32)
    config.train.lr = 3e-3
    result = train_model(
        config,
        tiny_data.subset(tiny_data.stems[:8]),
        tiny_data.subset(tiny_data.stems[8:]),
        tmp_path,
        device="cpu",
        progress=False,
    )
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all("val_dice" in h and "train_loss" in h for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    best = load_checkpoint(tmp_path / "best")
    assert best.metadata["epoch"] == result.best_epoch
    assert best.metadata["selected_on"] == "inner validation split"


def test_existing_run_needs_resume(tiny_data, tmp_path):
    config = tiny_config(epochs=1, image_size=32)
    train_model(config, tiny_data, None, tmp_path, device="cpu", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train_model(config, tiny_data, None, tmp_path, device="cpu", progress=False)


@pytest.mark.slow
class _Interrupt(Exception):
    """Stands for a kill at an epoch's end (the state of that epoch is saved)."""


def _stop_after(epoch: int):
    """An ``on_epoch`` callback that interrupts training once ``epoch`` has ended."""

    def stop(record):
        if record["epoch"] == epoch:
            raise _Interrupt

    return stop


def test_interrupted_training_resumes_to_identical_weights(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "STATE_EVERY_S", 0.0)  # save state after every epoch
    config = tiny_config(epochs=3, image_size=32)
    config.model.encoder = QUICK_ENCODER  # three trainings and a state saved every epoch
    config.train.ema_decay = 0.9
    config.train.precision = "fp32"  # bitwise comparison: oneDNN's bf16 kernels differ between CPUs
    train_model(config, tiny_data, None, tmp_path / "straight", device="cpu", progress=False)

    with pytest.raises(_Interrupt):
        train_model(
            config, tiny_data, None, tmp_path / "resumed", device="cpu", progress=False, on_epoch=_stop_after(2)
        )
    assert json.loads((tmp_path / "resumed" / "last_state.json").read_text())["epoch"] == 2
    capsys.readouterr()
    train_model(config, tiny_data, None, tmp_path / "resumed", device="cpu", progress=False, resume=True)
    assert "note: resuming" in capsys.readouterr().err  # without progress bars, still said once
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    straight = load_checkpoint(tmp_path / "straight" / "best").model.state_dict()
    resumed = load_checkpoint(tmp_path / "resumed" / "best").model.state_dict()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["paper", "strong"])
def test_training_step_never_waits_for_the_device(tmp_path, monkeypatch, recipe):
    """No tensor becomes a Python value inside the step loop (on a GPU that is a host-device sync
    per step, which stops the host from queueing work ahead): conversions must not grow with the
    number of steps. Counted on CPU through the Python-level conversions."""
    import sys

    conversions = {"count": 0}
    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            # torch.optim's own step counters (optimizers, AveragedModel) stay on the CPU by design,
            # or on the device without being read (fused Adam on CUDA): not a sync.
            if "torch/optim/" not in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                conversions["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    data = build_cache(
        write_synthetic_dataset(tmp_path / "data", n=16), 32, cache_dir=tmp_path / "cache", progress=False
    )
    counts = []
    for n_images in (8, 16):  # 2 and 4 steps per epoch
        config = tiny_config(recipe=recipe, epochs=1, image_size=32)
        config.train.compile = False
        conversions["count"] = 0
        train_model(
            config, data.subset(data.stems[:n_images]), None, tmp_path / f"run{n_images}", device="cpu", progress=False
        )
        counts.append(conversions["count"])
    assert counts[0] == counts[1], counts


def test_the_config_and_the_losses_name_the_same_losses() -> None:
    from polypseg.core.config import LOSS_NAMES

    assert sorted(LOSS_NAMES) == sorted(LOSSES)


def test_init_from_starts_from_the_trained_weights_and_records_them(tiny_data, tmp_path):
    first = tiny_config(epochs=1, image_size=32)
    train_model(first, tiny_data, None, tmp_path / "first", device="cpu", progress=False)
    trained = load_checkpoint(tmp_path / "first" / "best").model.state_dict()

    refine = tiny_config(epochs=1, image_size=32)
    refine.train.init_from = str(tmp_path / "first" / "best")
    step = training.TrainStep(refine, torch.device("cpu"))
    started = step.model.state_dict()
    assert all(torch.equal(started[k], trained[k]) for k in trained)
    fresh = training.TrainStep(tiny_config(epochs=1, image_size=32), torch.device("cpu")).model.state_dict()
    assert not all(torch.equal(fresh[k], trained[k]) for k in trained if trained[k].is_floating_point())

    train_model(refine, tiny_data, None, tmp_path / "refined", device="cpu", progress=False)
    init = load_checkpoint(tmp_path / "refined" / "best").metadata["init"]
    assert init["from"] == refine.train.init_from
    assert init["weights_sha256"] == file_sha256(tmp_path / "first" / "best.safetensors")


def test_a_resume_refuses_init_weights_that_changed_since_the_run_started(tiny_data, tmp_path, monkeypatch):
    """``--init NAME`` is resolved again on resume: a file that changed behind the name (a shipped model
    after an upgrade) would go on from other weights than the run's record says, so it is refused."""
    monkeypatch.setattr(training, "STATE_EVERY_S", 0.0)
    source = tiny_config(epochs=1, image_size=32)
    source.model.encoder = QUICK_ENCODER
    train_model(source, tiny_data, None, tmp_path / "source", device="cpu", progress=False)
    refine = tiny_config(epochs=2, image_size=32)
    refine.model.encoder = QUICK_ENCODER
    refine.train.init_from = str(tmp_path / "source" / "best")

    with pytest.raises(_Interrupt):
        train_model(
            refine, tiny_data, None, tmp_path / "refined", device="cpu", progress=False, on_epoch=_stop_after(1)
        )
    torch.manual_seed(1)
    replaced = tiny_config(epochs=1, image_size=32)
    replaced.model.encoder = QUICK_ENCODER
    save_checkpoint(tmp_path / "source" / "best", create_model(replaced.model), replaced)  # other weights, same name
    with pytest.raises(ConfigError, match=r"--init .*source/best: its weights changed since this run started"):
        train_model(refine, tiny_data, None, tmp_path / "refined", device="cpu", progress=False, resume=True)


def test_init_from_refuses_another_architecture_and_a_cv_run(tiny_data, tmp_path):
    first = tiny_config(epochs=1, image_size=32)
    train_model(first, tiny_data, None, tmp_path / "run" / "fold_0", device="cpu", progress=False)
    train_model(first, tiny_data, None, tmp_path / "run" / "fold_1", device="cpu", progress=False)
    other = tiny_config(epochs=1, image_size=32)
    other.model.decoder_channels = (32, 16, 8, 8, 4)
    other.train.init_from = str(tmp_path / "run" / "fold_0" / "best")
    with pytest.raises(ConfigError, match=r"--init .*model\.decoder_channels"):
        training.load_initial_weights(create_model(other.model), other)
    both = tiny_config(epochs=1, image_size=32)
    both.train.init_from = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="2 folds; name one fold"):
        training.load_initial_weights(create_model(both.model), both)
    missing = tiny_config(epochs=1, image_size=32)
    missing.train.init_from = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="no polypseg checkpoint found"):
        training.load_initial_weights(create_model(missing.model), missing)


def test_unknown_loss_optimizer_and_schedule_are_config_errors():
    with pytest.raises(ConfigError, match="unknown loss 'l7'"):
        create_loss("l7")
    with pytest.raises(ConfigError, match="unknown optimizer 'lion'"):
        training.create_optimizer(torch.nn.Linear(2, 1), TrainConfig(optimizer="lion"))
    with pytest.raises(ConfigError, match="unknown schedule 'step'"):
        lr_factor(TrainConfig(schedule="step"), 0, 10, 1)


def test_progress_in_a_log_is_one_line_per_epoch_and_silent_when_disabled(tiny_data, tmp_path, capsys):
    """Output that is not a terminal (a background run's log) gets a plain line per epoch, not a bar."""
    config = tiny_config(epochs=2, image_size=32)
    train_model(
        config, tiny_data, tiny_data.subset(tiny_data.stems[:4]), tmp_path / "a", device="cpu", description="fold 3"
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fold 3: epoch")]
    assert [line.split(",")[0] for line in lines] == ["fold 3: epoch 1/2", "fold 3: epoch 2/2"]
    assert all("val dice" in line for line in lines)
    assert lines[0].endswith("min to go") and lines[1].endswith(" s")  # the last epoch has nothing left
    train_model(config, tiny_data, None, tmp_path / "b", device="cpu", progress=False)
    assert "epoch" not in capsys.readouterr().out


def test_the_best_checkpoint_keeper_writes_best_only_when_an_epoch_scores_higher(tmp_path):
    from polypseg.models.checkpoint import read_metadata
    from polypseg.training.state import BestCheckpoint, TrainingState

    config = tiny_config(image_size=32)
    torch.manual_seed(0)
    model = create_model(config.model)
    best = BestCheckpoint(tmp_path / "best")
    best.offer(0.4, {"epoch": 1, "val_dice": 0.4, "train_loss": 1.0}, model, config, validated=True, init=None)
    written = read_metadata(tmp_path / "best")
    assert (best.epoch, best.score) == (1, 0.4) and best.record["metrics"] == {"val_dice": 0.4}
    assert best.record["tensors_sha256"] == written["tensors_sha256"]
    assert best.record["extra"] == {"epoch": 1, "selected_on": "inner validation split"}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a later epoch's weights
    for score in (0.3, 0.4, float("nan")):  # lower, equal, undefined: the best stays
        best.offer(score, {"epoch": 2, "val_dice": score}, model, config, validated=True, init=None)
    assert best.epoch == 1 and read_metadata(tmp_path / "best")["tensors_sha256"] == written["tensors_sha256"]
    # a state saved after epoch 1 holds those weights already; after epoch 2 it must carry epoch 1's
    assert best.tensors_for_state(1) is None and best.tensors_for_state(2) is best.tensors
    state = TrainingState(2, [{"epoch": 1}, {"epoch": 2}], best).to_state(steps_per_epoch=5)
    assert state == {
        "epoch": 2,
        "global_step": 10,
        "history": [{"epoch": 1}, {"epoch": 2}],
        "best_score": 0.4,
        "best_epoch": 1,
        "best": best.record,
    }
    restored = BestCheckpoint.from_state(tmp_path / "best", {**state, "best_state": None}, model)
    assert restored.tensors is None and (restored.epoch, restored.score) == (1, 0.4)  # epoch 2's weights are not it
    at_best = BestCheckpoint.from_state(tmp_path / "best", {**state, "epoch": 1, "best_score": None}, model)
    assert at_best.score == float("-inf") and at_best.tensors is not None  # the loaded weights are the best's


@pytest.mark.parametrize("freeze_norm", [False, True])
def test_freeze_norm_keeps_batch_norm_statistics_and_still_trains(tiny_data, tmp_path, freeze_norm):
    config = tiny_config(epochs=1, image_size=32)
    config.train.ema_decay, config.train.freeze_norm = 0.0, freeze_norm
    start = training.TrainStep(config, torch.device("cpu")).model.state_dict()
    train_model(config, tiny_data, None, tmp_path / "run", device="cpu", progress=False)
    trained = load_checkpoint(tmp_path / "run" / "best").model.state_dict()
    statistics = [k for k in start if k.endswith(("running_mean", "running_var"))]
    affine = [k.replace("running_mean", "weight") for k in statistics if k.endswith("running_mean")]
    assert statistics and affine
    kept = all(torch.equal(start[k], trained[k]) for k in statistics)
    assert kept == freeze_norm
    assert not all(torch.equal(start[k], trained[k]) for k in affine)  # scale and shift learn either way
    saved = config.to_dict()["train"]  # written only when set: older configs save byte for byte as before
    assert ("freeze_norm" in saved) == freeze_norm


def test_freeze_encoder_trains_only_the_decoder_and_head(tiny_data, tmp_path):
    config = tiny_config(epochs=1, image_size=32)
    config.train.ema_decay, config.train.freeze_encoder = 0.0, True
    training.seed_everything(config.train.seed)  # the same initial weights as the run's
    start = training.TrainStep(config, torch.device("cpu")).model.state_dict()
    train_model(config, tiny_data, None, tmp_path / "run", device="cpu", progress=False)
    trained = load_checkpoint(tmp_path / "run" / "best").model.state_dict()
    encoder = [k for k in start if k.startswith("encoder.")]
    learning = [k for k in start if not k.startswith("encoder.") and k.endswith("weight")]
    assert encoder and learning
    assert all(torch.equal(start[k], trained[k]) for k in encoder)  # weights and BatchNorm statistics
    assert not all(torch.equal(start[k], trained[k]) for k in learning)
    assert "freeze_encoder" in config.to_dict()["train"]
    config.train.freeze_encoder = False
    assert "freeze_encoder" not in config.to_dict()["train"]


def test_replay_adds_its_pairs_to_training_only_and_a_resume_reuses_them(tmp_path, monkeypatch):
    from polypseg.core.runs import RunDir, RunError
    from polypseg.training import train_split
    from polypseg.training.train_split import REPLAY_PREFIX, choose_replay_stems, train_single_split

    data = write_synthetic_dataset(tmp_path / "review", n=8)
    replay_root = write_synthetic_dataset(tmp_path / "replay", n=6, seed=3)  # same stem names, other images
    test_list = tmp_path / "test.txt"
    test_list.write_text("case00\ncase01\n")
    config = tiny_config(image_size=32)
    config.train.val_fraction = 0.25
    config.train.replay_data, config.train.replay_images = str(replay_root), 3
    seen = []
    real_train_model = train_split.train_model
    monkeypatch.setattr(
        train_split, "train_model", lambda config, train, val, *a, **k: seen.append((train, val)) or real_train_model(
            config, train, val, *a, **k)
    )  # fmt: skip
    kwargs = dict(device="cpu", progress=False, cache_dir=tmp_path / "cache")
    out = tmp_path / "run"
    result = train_single_split(data, out, config, test_list=test_list, **kwargs)

    split = RunDir(out).read_split()
    assert split["replay_data"] == str(replay_root.resolve())
    assert split["replay"] == choose_replay_stems([f"case{i:02d}" for i in range(6)], 3, config.train.seed, "")
    train, val = seen[-1]
    assert train.stems == split["train"] + [REPLAY_PREFIX + s for s in split["replay"]]  # exactly 3 more
    assert val.stems == split["val"] and not set(split["val"]) & {"case00", "case01"}
    assert result["test"]["n_images"] == 2
    replay_cache = build_cache(replay_root, 32, cache_dir=tmp_path / "cache", progress=False)
    torch.testing.assert_close(
        torch.from_numpy(train.images[-3:]), torch.from_numpy(replay_cache.subset(split["replay"]).images)
    )

    # a resume trains on the saved replay pairs, never a new draw (here: a hand-edited choice survives)
    split["replay"] = ["case04", "case05"]
    RunDir(out).write_split(split)
    train_single_split(data, out, config, resume=True, **kwargs)
    assert seen[-1][0].stems[-2:] == ["replay:case04", "replay:case05"]
    assert RunDir(out).read_split() == split
    # ... and refuses other replay settings
    config.train.replay_images = 2
    with pytest.raises(RunError, match="train.replay_images: 3 -> 2"):
        train_single_split(data, out, config, resume=True, **kwargs)


def test_replay_of_the_same_data_never_trains_on_held_out_or_init_unseen_pairs(tmp_path, monkeypatch):
    """Replaying the run's own data (here a copy elsewhere) leaves out its test and inner-validation
    pairs, and the test pairs of the --init run; split.json records the pairs replayed."""
    import shutil

    from polypseg.core.runs import RunDir
    from polypseg.training import train_split

    from helpers import save_tiny_checkpoint

    data = write_synthetic_dataset(tmp_path / "data", n=10)
    copy = shutil.copytree(data, tmp_path / "copy")
    init = tmp_path / "init"
    save_tiny_checkpoint(init)
    test_list = tmp_path / "test.txt"
    test_list.write_text("case00\ncase01\n")
    config = tiny_config(image_size=32)
    config.model.decoder_channels = (8, 8, 8, 8, 8)
    config.train.val_fraction, config.train.init_from = 0.25, str(init)
    from polypseg.data.splits import inner_validation_split

    train, val = inner_validation_split([f"case{i:02d}" for i in range(2, 10)], 0.25, config.train.seed)
    init_unseen = train[0]
    RunDir(init).write_split({"data": str(data), "train": [], "val": [], "test": [init_unseen]})
    config.train.replay_data, config.train.replay_images = str(copy), len(train) - 1

    class Stop(Exception):
        pass

    seen = []
    monkeypatch.setattr(train_split, "train_model", lambda config, train, *a, **k: seen.append(train) or _raise(Stop()))
    with pytest.raises(Stop):
        train_split.train_single_split(
            data, tmp_path / "run", config, test_list=test_list, device="cpu", progress=False
        )
    split = RunDir(tmp_path / "run").read_split()
    assert (split["train"], split["val"]) == (train, val)
    assert split["replay"] == train[1:]  # all but the held-out pairs of both runs
    assert seen[0].stems[-len(train) + 1 :] == [train_split.REPLAY_PREFIX + s for s in split["replay"]]

    config.train.replay_images = len(train)
    with pytest.raises(
        ConfigError, match=rf"leaving out the 5 held out\) holds only {len(train) - 1} image/mask pairs"
    ):
        train_split.train_single_split(data, tmp_path / "run2", config, test_list=test_list, device="cpu")


def _raise(error: Exception) -> None:
    raise error


def test_replay_asking_for_more_pairs_than_the_dataset_holds_names_the_field(tmp_path):
    from polypseg.training.train_split import train_single_split

    data = write_synthetic_dataset(tmp_path / "review", n=4)
    config = tiny_config(image_size=32)
    config.train.replay_data, config.train.replay_images = str(data), 5
    with pytest.raises(ConfigError, match=r"^train\.replay_images 5: .* holds only 4 image/mask pairs"):
        train_single_split(data, tmp_path / "run", config, device="cpu", progress=False, cache_dir=tmp_path / "c")
    assert not (tmp_path / "run").exists()


def test_cached_data_joins_only_same_size_pairs_with_distinct_stems(tiny_data):
    from polypseg.data.cache import CachedData
    from polypseg.data.images import DataError

    first, second = tiny_data.subset(tiny_data.stems[:3]), tiny_data.subset(tiny_data.stems[3:5])
    joined = first.concat(second)
    assert joined.stems == tiny_data.stems[:5] and joined.images.shape[0] == joined.masks.shape[0] == 5
    assert joined.original_sizes == tiny_data.original_sizes[:5]
    with pytest.raises(DataError, match="in both sets"):
        first.concat(first)
    assert first.concat(first.renamed("again:")).stems[3:] == [f"again:{s}" for s in first.stems]
    small = CachedData(["x"], first.images[:1, :16, :16], first.masks[:1, :16, :16], [(16, 16)], 16)
    with pytest.raises(DataError, match="cannot join 16px pairs to 32px pairs"):
        first.concat(small)


def test_a_resume_accepts_the_replay_data_moved_and_refuses_other_data_at_its_path(tmp_path, monkeypatch):
    import shutil

    from polypseg.core.runs import RunDir, RunError
    from polypseg.training.train_split import train_single_split

    data = write_synthetic_dataset(tmp_path / "review", n=6)
    for place in ("first", "moved"):
        (tmp_path / place).mkdir()
    write_synthetic_dataset(tmp_path / "first" / "replay", n=5, seed=3)
    config = tiny_config(image_size=32)
    config.train.val_fraction = 0.0
    config.train.replay_data, config.train.replay_images = "replay", 2  # relative: resolved where the run starts
    kwargs = dict(device="cpu", progress=False, cache_dir=tmp_path / "cache")
    monkeypatch.chdir(tmp_path / "first")
    train_single_split(data, tmp_path / "run", config, **kwargs)
    assert RunDir(tmp_path / "run").read_split()["replay_data"] == str(tmp_path / "first" / "replay")
    monkeypatch.chdir(tmp_path / "moved")
    shutil.copytree(tmp_path / "first" / "replay", tmp_path / "moved" / "replay")
    train_single_split(data, tmp_path / "run", config, resume=True, **kwargs)  # the same pairs elsewhere
    shutil.rmtree(tmp_path / "moved" / "replay")
    write_synthetic_dataset(tmp_path / "moved" / "replay", n=5, seed=4)
    with pytest.raises(RunError, match="train.replay_data: "):
        train_single_split(data, tmp_path / "run", config, resume=True, **kwargs)


def test_train_never_overwrites_the_settings_of_a_run_already_in_out(tmp_path):
    """A CV run's folder (its history lives in fold_*/) and a started training's settings are both
    refused without touching config.json, so the runs they belong to can still be resumed."""
    from polypseg.core.runs import CV, RunDir, RunError, RunSettings
    from polypseg.training.train_split import train_single_split

    data = write_synthetic_dataset(tmp_path / "data", n=4)
    config = tiny_config(image_size=32)
    cv_run, started = RunDir(tmp_path / "cv"), RunDir(tmp_path / "train")
    cv_run.path.mkdir()
    cv_run.write_settings(RunSettings(config=tiny_config(), kind=CV, data=str(data), folds=2, seed=0))
    started.path.mkdir()
    before = cv_run.config_path.read_bytes()
    with pytest.raises(RunError, match="holds a cross-validation run .*choose a new --out"):
        train_single_split(data, cv_run.path, config, device="cpu", progress=False)
    assert cv_run.config_path.read_bytes() == before
    config.save(started.config_path)
    with pytest.raises(RunError, match="already holds a training run; pass --resume"):
        train_single_split(data, started.path, config, device="cpu", progress=False)
