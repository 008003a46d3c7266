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
