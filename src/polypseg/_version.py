"""The package version, importable without importing anything else (the CLI's ``--version``)."""

from __future__ import annotations

__version__ = "0.1.0"


def source_commit() -> str | None:
    """The git commit of the source tree polypseg runs from (an editable install in a checkout), with
    ``-dirty`` when tracked files differ from it; None for an installed wheel or without git.

    A run of hours spans sessions and commits: each invocation records which code ran it.
    """
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=False
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
