"""Shared fixtures. Session-scoped ones are built once per test run and must be treated as read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import tiny_config


@pytest.fixture(scope="session")
def tiny_cv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, finished 2-fold CV run on the bundled 40-image sample (1 epoch, 64 px, ResNet-18, 16-channel decoder).

    It has an inner validation split (so validation curves exist) and Grad-CAM metrics on 2 held-out
    images per fold. Its data cache is ``tiny_cv_run.parent / "cache"``. Copy it before changing anything in it.
    """
    from polypseg.cv import run_cv
    from polypseg.sample_data import sample_dataset_path

    root = tmp_path_factory.mktemp("tiny_cv")
    config = tiny_config()
    config.train.val_fraction = 0.25
    run_cv(
        sample_dataset_path(),
        root / "run",
        config,
        folds=2,
        seed=0,
        progress=False,
        explain=True,
        explain_max_images=2,
        cache_dir=root / "cache",
        report=False,
    )
    return root / "run"
