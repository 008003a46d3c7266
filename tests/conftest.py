"""Shared fixtures. Session-scoped ones are built once per test run and must be treated as read-only."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import save_tiny_checkpoint, tiny_config

REPO = Path(__file__).resolve().parents[1]
SHARED_ENV = "POLYPSEG_SHARED_DATASETS"
_CACHE_OWNER = "POLYPSEG_TEST_CACHE"  # the test run's cache folder, set by the process that made (and removes) it
_CACHE_DIR: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Every derived file the tests make (data caches, ONNX exports) goes to a temporary cache,
    not the user's ~/.cache/polypseg.

    Tests and the processes they start run torch on one thread unless ``OMP_NUM_THREADS`` says
    otherwise: the models here are tiny, and a second thread mostly waits for the first (a resumed
    training test and a bench-train row of the benchmark scripts' smoke run each used 3-4x the CPU
    time on two threads) and stalls when the cores are shared.
    Set before torch is imported, so it holds in this process and in every subprocess.
    """
    import tempfile

    global _CACHE_DIR
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_CACHE_OWNER):
        # A worker: the folder its controller made, shared by all workers, so a model exported by one
        # (the session's tiny checkpoint is the same file in every worker) is not exported again by
        # another. Entries are keyed by content and written atomically, as for concurrent users.
        os.environ["POLYPSEG_CACHE"] = os.environ[_CACHE_OWNER]
    else:
        _CACHE_DIR = Path(tempfile.mkdtemp(prefix="polypseg-test-cache-"))
        os.environ["POLYPSEG_CACHE"] = os.environ[_CACHE_OWNER] = str(_CACHE_DIR)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses the ``tiny_cv_run`` fixture (a real cross-validation, about a minute on
    2 cores) is marked ``slow``, so ``pytest -m "not slow"`` never builds it."""
    for item in items:
        if "tiny_cv_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    _modules_with_slow_tests_first(items)


def _modules_with_slow_tests_first(items: list[pytest.Item]) -> None:
    """Files with ``slow`` tests run first, each file's tests together and in their order.

    With ``-n`` (pytest-xdist, in ``addopts``) the workers take files in this order; a file with a
    minute-long test taken last would leave the other worker idle while it runs, taken first it
    overlaps with the many short ones.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: files stay together, in order


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def shared_dataset_candidates() -> list[Path]:
    """Where the shared real datasets may be, first match wins: ``$POLYPSEG_SHARED_DATASETS``, then
    ``../shared/datasets`` beside this repository, then beside the repository it was cloned from
    (a local ``origin``), so a fresh clone anywhere still finds them."""
    candidates = []
    if os.environ.get(SHARED_ENV):
        candidates.append(Path(os.environ[SHARED_ENV]).expanduser())
    candidates.append(REPO.parent / "shared" / "datasets")
    try:
        origin = subprocess.run(
            ["git", "-C", str(REPO), "remote", "get-url", "origin"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    origin = origin.removeprefix("file://")
    if origin and "://" not in origin and not origin.startswith("git@") and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "datasets")
    return list(dict.fromkeys(candidates))


def find_shared_datasets() -> Path | None:
    """The shared datasets folder (see :func:`shared_dataset_candidates`), or ``None``."""
    return next((path for path in shared_dataset_candidates() if path.is_dir()), None)


@pytest.fixture(scope="session")
def shared_dataset() -> Callable[[str], Path]:
    """``shared_dataset("kvasir-seg")``: that folder of the shared real datasets (read-only: copy
    before changing anything). Skips the test, with one reason saying where it looked, only when
    the folder is truly absent."""

    def get(name: str) -> Path:
        root = find_shared_datasets()
        if root is None:
            looked = ", ".join(str(p) for p in shared_dataset_candidates())
            pytest.skip(f"shared datasets not found (looked in {looked}; set {SHARED_ENV} to their folder)")
        path = root / name
        if not path.is_dir():
            pytest.skip(f"shared dataset {name} not found in {root}")
        return path

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One :func:`helpers.save_tiny_checkpoint` for the whole run (read-only). Tests of the ONNX engines
    share it, so its ONNX export, cached by content in the run's cache folder, is made once."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def tiny_cv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, finished 2-fold CV run on the bundled 40-image sample (1 epoch, 64 px, ResNet-18, 16-channel decoder).

    It has an inner validation split (so validation curves exist) and Grad-CAM metrics on 2 held-out
    images per fold. Its data cache is ``tiny_cv_run.parent / "cache"``. Copy it before changing anything in it.
    """
    from polypseg.data.sample_data import sample_dataset_path
    from polypseg.experiments.cv import run_cv

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
