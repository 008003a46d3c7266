"""One train/validation/test split (``polypseg train``), e.g. the PraNet protocol."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polypseg.core.config import ConfigError, RunConfig, config_differences, validate_config
from polypseg.core.devices import resolve_device
from polypseg.core.io_utils import atomic_write_json
from polypseg.core.runs import TRAIN, RunDir, RunError, RunSettings, refuse_changed_settings
from polypseg.data.cache import CachedData, build_cache, resumed_data
from polypseg.data.images import DataError
from polypseg.data.splits import inner_validation_split, load_split_file, require_training_part
from polypseg.models.checkpoint import load_checkpoint
from polypseg.training.distributed import DistributedContext
from polypseg.training.evaluation import evaluate_probabilities
from polypseg.training.init_source import init_unseen_stems
from polypseg.training.loop import predict_with_recipe, resolve_run_precision, train_model

log = logging.getLogger(__name__)

# Replayed pairs are named ``replay:STEM`` in the training data, so their stems never clash with the main data's.
REPLAY_PREFIX = "replay:"


def train_single_split(
    data: Path | str,
    out: Path | str,
    config: RunConfig,
    *,
    test_list: Path | str | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    cache_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Train on ``data`` minus the stems in ``test_list``; evaluate once on those stems if given.

    The best epoch is chosen on an inner validation split (``config.train.val_fraction`` of the
    training stems, seeded with ``config.train.seed``), never on the test stems. The split is saved
    in ``OUT/split.json`` when the run starts; ``resume=True`` continues with the saved split (and
    ``config`` must match the saved one; a ``test_list``, if given, must match the saved test stems).

    With ``config.train.replay_images`` > 0, that many pairs of ``config.train.replay_data``
    (drawn with ``config.train.seed``) join the training part only; ``split.json`` records them
    (``replay_data``, ``replay``) and a resumed run trains on exactly those. The draw leaves out the
    test and inner-validation images of ``data`` (when the replay data holds the same pairs) and the
    images the ``train.init_from`` run held out, so no held-out image is trained on.
    """
    run = RunDir(out)
    validate_config(config)
    resolve_run_precision(config, device)
    context = DistributedContext.from_env()
    saved = _check_start(run, config, resume=resume, is_main=context.is_main)
    split = run.read_split() if resume else None
    if split is not None and split.get("data"):
        # Resuming reads the run's own data: --data omitted, or the same content elsewhere.
        data, change = resumed_data(str(split["data"]), data)
        refuse_changed_settings(run.path, change)
    cache = build_cache(data, config.train.image_size, cache_dir=cache_dir, progress=progress)
    test_stems: list[str] | None = None
    if test_list is not None:
        test_stems = load_split_file(test_list)
        _check_stems(test_stems, cache.stems, f"{test_list}", data)
    if split is not None:
        train, val, test_stems = _saved_split(run, split, cache.stems, test_stems, data)
    else:
        test_stems = test_stems or []
        held_out = set(test_stems)
        train, val = inner_validation_split(
            [s for s in cache.stems if s not in held_out], config.train.val_fraction, config.train.seed
        )
        require_training_part(train, data=data, n_test=len(held_out), n_val=len(val), test_list=test_list)
    replay = _replay_pairs(
        config, run, split, data=cache, held_out=test_stems + val, cache_dir=cache_dir, progress=progress
    )
    if context.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        if saved is None:
            run.write_settings(RunSettings(config=config, kind=TRAIN))
        if split is None:
            run.write_split(_split_record(data, train, val, test_stems, replay))
    training_part = cache.subset(train)
    if replay is not None:
        training_part = training_part.concat(replay.pairs.renamed(REPLAY_PREFIX))
    result = train_model(
        config,
        training_part,
        cache.subset(val) if val else None,
        run.path,
        device=device,
        resume=resume,
        progress=progress,
    )
    summary: dict[str, Any] = {"checkpoint": str(result.best_checkpoint), "best_epoch": result.best_epoch}
    if test_stems and context.is_main:
        summary["test"] = _score_test(result.best_checkpoint, cache.subset(test_stems), config, device)
        atomic_write_json(run.test_metrics_path, summary["test"])
    return summary


def _check_start(run: RunDir, config: RunConfig, *, resume: bool, is_main: bool) -> RunSettings | None:
    """The run's saved settings; refuses a CV run's folder, a new start over a run, and changed settings."""
    saved = run.saved_settings()
    if saved is not None and saved.kind != TRAIN:
        raise RunError(
            f"{run.path} holds a cross-validation run (polypseg cv), not a single-split training; choose a new --out"
        )
    # Only the main process judges a new start: under torchrun the others may find the settings it
    # has just written for this very run (they stop with it when it refuses).
    if not resume and is_main and (saved is not None or run.history_path().is_file()):
        raise RunError(f"{run.path} already holds a training run; pass --resume to continue it, or choose a new --out")
    if saved is not None:
        refuse_changed_settings(run.path, config_differences(saved.config, config))
    return saved


def _split_record(
    data: Path | str, train: list[str], val: list[str], test: list[str], replay: _Replay | None
) -> dict[str, Any]:
    """What ``split.json`` holds: the data, the three parts and the replay pairs, if any."""
    record: dict[str, Any] = {"data": str(Path(data).resolve()), "train": train, "val": val, "test": test}
    if replay is not None:
        record.update(replay_data=replay.root, replay=replay.pairs.stems)
    return record


def _score_test(checkpoint_path: Path, test: CachedData, config: RunConfig, device: str) -> dict[str, Any]:
    """The best checkpoint's metrics on the held-out test images, scored once, as the recipe predicts."""
    torch_device = resolve_device(device)
    checkpoint = load_checkpoint(checkpoint_path, device=torch_device)
    probs = predict_with_recipe(checkpoint.model, test.images, config.train, torch_device)
    metric = evaluate_probabilities(probs, test.masks, test.stems)
    per_image = metric.per_image(0.5)["dice"].round(6).tolist()
    return {
        "n_images": len(test.stems),
        **metric.compute(),
        "per_image_dice_at_0.5": dict(zip(test.stems, per_image, strict=False)),
    }


@dataclass(frozen=True)
class _Replay:
    root: str  # the replay dataset, resolved
    pairs: CachedData  # the chosen pairs, stems as in the replay dataset


def _replay_pairs(
    config: RunConfig,
    run: RunDir,
    split: dict[str, Any] | None,
    *,
    data: CachedData,
    held_out: Sequence[str],
    cache_dir: Path | str | None,
    progress: bool,
) -> _Replay | None:
    """The replay pairs of ``config.train`` (``None`` when off): the ones a resumed run saved in its
    ``split.json``, else ``replay_images`` stems of ``replay_data`` drawn with ``seed`` from those
    that are none of ``data``'s ``held_out`` pairs (test and inner validation) nor held out by ``--init``."""
    train = config.train
    if train.replay_images == 0:
        return None
    root = str(Path(train.replay_data).resolve())
    if split is not None and split.get("replay_data"):
        # The same dataset moved (same content elsewhere) is accepted, as for the main data.
        saved_root = str(split["replay_data"])
        root, change = resumed_data(saved_root, train.replay_data)
        if change:
            refuse_changed_settings(run.path, [f"train.replay_data: {saved_root!r} -> {train.replay_data!r}"])
    cache = build_cache(root, train.image_size, cache_dir=cache_dir, progress=progress)
    if split is not None and "replay" in split:
        stems = list(split["replay"])
        _check_stems(stems, cache.stems, f"{run.split_path}", root)
    else:
        # the held-out pairs are copied only here, when a draw needs them
        excluded = same_pairs(cache, data.subset(held_out)) | (set(cache.stems) & init_unseen_stems(config))
        if excluded:
            log.warning(
                "replay: %d pair(s) of %s are held out (test, inner validation or never seen by --init) "
                "and are not replayed",
                len(excluded),
                root,
            )
        source = f"{root} (leaving out the {len(excluded)} held out)" if excluded else root
        available = [s for s in cache.stems if s not in excluded]
        stems = choose_replay_stems(available, train.replay_images, train.seed, source)
    return _Replay(root=root, pairs=cache.subset(stems))


def same_pairs(replay: CachedData, held_out: CachedData) -> set[str]:
    """The stems of ``replay`` that are pairs of ``held_out``: the same stem with the same pixels
    (so a copy of the data elsewhere, or a cache file of it, counts as the same data)."""
    index = {stem: i for i, stem in enumerate(replay.stems)}
    return {
        stem
        for j, stem in enumerate(held_out.stems)
        if stem in index
        and np.array_equal(replay.images[index[stem]], held_out.images[j])
        and np.array_equal(replay.masks[index[stem]], held_out.masks[j])
    }


def choose_replay_stems(available: Sequence[str], count: int, seed: int, source: Path | str) -> list[str]:
    """``count`` of ``available`` drawn with ``seed`` (from the sorted stems, so the draw depends
    on nothing else), sorted."""
    stems = sorted(available)
    if count > len(stems):
        raise ConfigError(f"train.replay_images {count}: {source} holds only {len(stems)} image/mask pairs")
    rng = np.random.default_rng([seed])
    return sorted(stems[i] for i in rng.choice(len(stems), size=count, replace=False))


def _check_stems(stems: Sequence[str], available: Sequence[str], source: str, data: Path | str) -> None:
    missing = sorted(set(stems) - set(available))
    if missing:
        raise DataError(f"{source}: {len(missing)} stem(s) not in {data}, e.g. '{missing[0]}'")


def _saved_split(
    run: RunDir, split: dict[str, Any], available: Sequence[str], test_stems: list[str] | None, data: Path | str
) -> tuple[list[str], list[str], list[str]]:
    """``(train, val, test)`` of a resumed run, as saved in its ``split.json`` (never redrawn)."""
    train, val, saved_test = list(split["train"]), list(split["val"]), list(split["test"])
    if test_stems is not None and sorted(test_stems) != sorted(saved_test):
        raise RunError(
            f"{run.split_path} holds other test stems ({len(saved_test)}) than the --test-list given ({len(test_stems)}); "
            "resume with the run's own test list, or choose a new --out"
        )
    _check_stems(train + val + saved_test, available, f"{run.split_path}", data)
    return train, val, saved_test if test_stems is None else test_stems
