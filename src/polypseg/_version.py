"""The package version, importable without importing anything else (the CLI's ``--version``)."""

from __future__ import annotations

__version__ = "0.1.0"

_REPOSITORY_ENV = frozenset(
    {
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_COMMON_DIR",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_PREFIX",
    }
)


def source_commit() -> str | None:
    """The git commit of the source tree polypseg runs from (an editable install in a checkout), with
    ``-dirty`` when tracked files differ from it; None for an installed wheel or without git.

    A run of hours spans several invocations and commits: each invocation records which code ran it.
    """
    import os
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    # Inside a git hook (a pre-commit test run) these name the repository and index git was run on,
    # not this file's.
    env = {key: value for key, value in os.environ.items() if key not in _REPOSITORY_ENV}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                # no optional locks: status would otherwise refresh the index under a concurrent `git commit`
                ["git", "--no-optional-locks", "-C", str(here), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
                env=env,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if not git("ls-files", Path(__file__).name):  # not tracked: an installed copy, perhaps inside another repo
        return None
    commit = git("rev-parse", "--short=7", "HEAD")
    if not commit:
        return None
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return f"{commit}-dirty" if changed else commit
