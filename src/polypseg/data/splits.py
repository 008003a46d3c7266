"""Seeded data splits: K test folds for cross-validation, the inner validation split, and stem lists.

The splits are pure functions of the stems and seeds (no files): a run saves its split once
(``splits.json`` / ``split.json``, see :mod:`polypseg.core.runs`) and is resumed and reported from the
saved one. A fixed test set is given as a stem-list file (:func:`load_split_file`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def load_split_file(path: Path | str) -> list[str]:
    """Read a list of stems (one per line, ``#`` comments allowed)."""
    lines = Path(path).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def inner_validation_split(
    stems: Sequence[str], val_fraction: float, seed: int, fold: int | None = None
) -> tuple[list[str], list[str]]:
    """``(train, val)``: ``val_fraction`` of ``stems`` held out to choose the best epoch, seeded.

    The generator is seeded with ``[seed]`` for a single split and ``[seed, fold]`` for fold
    ``fold`` of a CV run (``[seed]`` draws what ``seed`` alone draws, so both reproduce the
    splits of runs saved before this function existed). Both lists are sorted.
    """
    stems = sorted(stems)
    n_val = int(round(val_fraction * len(stems)))
    if not n_val:
        return stems, []
    rng = np.random.default_rng([seed] if fold is None else [seed, fold])
    val = sorted(stems[i] for i in rng.choice(len(stems), size=n_val, replace=False))
    val_set = set(val)
    return [s for s in stems if s not in val_set], val


def make_splits(
    stems: Sequence[str],
    folds: int,
    seed: int = 0,
    val_fraction: float = 0.0,
) -> dict[str, Any]:
    """Seeded K-fold split of ``stems``; each fold lists ``train``, inner ``val`` and ``test`` stems."""
    from polypseg.data.images import DataError

    if folds < 2:
        raise ValueError("--folds must be at least 2")
    if len(stems) < folds:
        raise DataError(f"{len(stems)} pairs cannot be split into {folds} folds")
    stems = sorted(stems)
    rng = np.random.default_rng(seed)
    order = [stems[i] for i in rng.permutation(len(stems))]
    return splits_from_test_folds(stems, [sorted(order[i::folds]) for i in range(folds)], seed, val_fraction)


def splits_from_test_folds(
    stems: Sequence[str], tests: Sequence[Sequence[str]], seed: int, val_fraction: float
) -> dict[str, Any]:
    """Complete given test folds with each fold's training part and a seeded inner validation split."""
    stems = sorted(stems)
    result = []
    for fold, test in enumerate(tests):
        test_set = set(test)
        train, val = inner_validation_split([s for s in stems if s not in test_set], val_fraction, seed, fold)
        result.append({"fold": fold, "train": train, "val": val, "test": sorted(test)})
    return {"seed": seed, "k": len(tests), "val_fraction": val_fraction, "stems": stems, "folds": result}


def require_training_part(
    train: Sequence[str], *, data: Path | str, n_test: int, n_val: int, test_list: Path | str | None
) -> None:
    """A ``DataError`` naming why a split left no pair to train on (``--test-list``, the inner validation share)."""
    from polypseg.data.images import DataError

    if train:
        return
    test = f"{n_test} in --test-list {test_list}, " if test_list is not None else ""
    raise DataError(
        f"{data}: no pair is left to train on ({test}{n_val} for inner validation, train.val_fraction); "
        "hold out fewer images"
    )
