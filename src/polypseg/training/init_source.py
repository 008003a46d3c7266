"""Which trained model a fine-tuning run (``train.init_from``) starts from, checked without loading it.

The command line checks ``--init`` here before reading any data: the source must be one checkpoint
(a shipped model's name, a checkpoint, or a training run folder, not a CV run of several folds)
whose metadata describes the same architecture as the run's. Only the metadata is read: no model is
built and no weights are loaded; :func:`polypseg.training.loop.load_initial_weights` loads them when
training starts (and checks the tensors themselves).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from polypseg.core.config import ConfigError, RunConfig


def init_checkpoint(config: RunConfig) -> Path | None:
    """The one checkpoint ``config.train.init_from`` names, or ``None`` for ``none``.

    A source that is missing, not one checkpoint, or of another architecture is a
    :class:`~polypseg.core.config.ConfigError` naming it as ``--init SPEC``.
    """
    source = _init_source(config)
    return None if source is None else source[0]


def init_image_size(config: RunConfig) -> int | None:
    """The input size (px) the model ``config.train.init_from`` names was trained at, or ``None`` for
    ``none``; checked as :func:`init_checkpoint` checks it."""
    source = _init_source(config)
    return None if source is None else source[1].train.image_size


def _init_source(config: RunConfig) -> tuple[Path, RunConfig] | None:
    """The checkpoint ``config.train.init_from`` names and the run config in its metadata, checked."""
    from polypseg.models.checkpoint import CheckpointError, config_from_metadata, find_checkpoints, read_metadata
    from polypseg.models.pretrained import PretrainedError, resolve_model

    spec = config.train.init_from
    if spec == "none":
        return None
    label = f"--init {spec}"
    try:
        found = find_checkpoints(resolve_model(spec))
        if len(found) != 1:
            raise ConfigError(
                f"{label}: a run of {len(found)} folds; name one fold's checkpoint, e.g. {found[0].parent}"
            )
        source = config_from_metadata(read_metadata(found[0]), found[0])
    except (CheckpointError, PretrainedError) as error:
        raise ConfigError(f"{label}: {error}") from None
    ours, theirs = dataclasses.asdict(config.model), dataclasses.asdict(source.model)
    differ = [k for k in ours if k != "encoder_weights" and ours[k] != theirs.get(k)]
    if differ:
        raise ConfigError(
            f"{label}: its model differs from this run's in {', '.join(f'model.{k}' for k in differ)} "
            f"({', '.join(f'{theirs.get(k)!r} vs {ours[k]!r}' for k in differ)})"
        )
    return found[0], source


def init_unseen_stems(config: RunConfig) -> set[str]:
    """The stems the ``config.train.init_from`` model was tested on and never trained on: the test
    stems its training folder's ``split.json`` (or its CV run's ``splits.json`` fold) saved; empty
    for ``none`` and for a model whose folder records no split (a shipped model lists no stems)."""
    from polypseg.core.runs import RunDir, parse_fold_name

    checkpoint = init_checkpoint(config)
    if checkpoint is None:
        return set()
    folder = checkpoint.parent
    split = RunDir(folder).read_split()
    if split is not None:
        return set(split.get("test", []))
    fold = parse_fold_name(folder.name)
    splits = RunDir(folder.parent).read_splits() if fold is not None else None
    for entry in (splits or {}).get("folds", []):
        if entry.get("fold") == fold:
            return set(entry.get("test", []))
    return set()


def init_held_out_note(config: RunConfig) -> str | None:
    """What the ``config.train.init_from`` model's release notes say it never saw (a shipped model's
    ``release.data.held_out``), or ``None``: such a model lists no stems, so replay cannot leave them out."""
    from polypseg.models.checkpoint import read_metadata

    checkpoint = init_checkpoint(config)
    if checkpoint is None:
        return None
    release = read_metadata(checkpoint).get("release", {})
    held_out = release.get("data", {}).get("held_out") if isinstance(release, dict) else None
    return str(held_out) if held_out else None
