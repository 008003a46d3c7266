"""Which code ran: the source commit recorded with each CV invocation."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

import polypseg._version as version_module

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _copy_of_version_module(folder: Path) -> ModuleType:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "_version.py"
    shutil.copy(version_module.__file__, path)
    spec = importlib.util.spec_from_file_location("copied_version", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.email=t@example.org", "-c", "user.name=t", *args]
    env = {key: value for key, value in os.environ.items() if key not in version_module._REPOSITORY_ENV}
    return subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout.strip()


def test_commit_of_a_checkout_and_dirty_when_the_package_changed(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    module = _copy_of_version_module(tmp_path / "src" / "pkg")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "--short=7", "HEAD")
    assert module.source_commit() == head
    (tmp_path / "README.md").write_text("outside the package: not dirty\n")
    assert module.source_commit() == head
    (tmp_path / "src" / "pkg" / "_version.py").write_text("# changed\n", encoding="utf-8")
    assert module.source_commit() == f"{head}-dirty"


def test_a_git_hooks_repository_variables_do_not_redirect_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other, repo = tmp_path / "other", tmp_path / "repo"
    for folder in (other, repo):
        folder.mkdir()
        _git(folder, "init", "-q")
    module = _copy_of_version_module(repo / "pkg")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    # a pre-commit hook running the tests exports the repository it was run on, and its index
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_INDEX_FILE", str(other / ".git" / "index.lock"))
    assert module.source_commit() == _git(repo, "rev-parse", "--short=7", "HEAD")


def test_an_untracked_copy_inside_another_repository_names_no_commit(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "other.txt").write_text("x\n")
    _git(tmp_path, "add", "other.txt")
    _git(tmp_path, "commit", "-q", "-m", "theirs")
    module = _copy_of_version_module(tmp_path / ".venv" / "site-packages" / "pkg")  # e.g. a venv in a project
    assert module.source_commit() is None


def test_outside_any_repository_or_without_git_names_no_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert _copy_of_version_module(tmp_path / "pkg").source_commit() is None

    def no_git(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert version_module.source_commit() is None
