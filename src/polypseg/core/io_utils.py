"""Small file helpers: atomic writes so that an interrupted run never leaves a half-written file.

Every write goes to a temporary file in the target's folder, named
``.NAME.pidPID.RANDOM.tmp``, and is renamed onto ``NAME`` only once complete, so a reader sees the
old file or the new one, never a mix. A process killed mid-write leaves its temporary file behind;
:func:`remove_stale_temps` (called when a run is resumed) deletes those whose process is gone.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# .NAME.pid1234.abcd_123.tmp (this version) and .NAME.abcd_123.tmp (before the pid was recorded)
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.(?:pid(?P<pid>\d+)\.)?[A-Za-z0-9_]{8}\.tmp$")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then atomically rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would make results unreadable to others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a newly created file gets under this process's umask (what mkstemp's 0600 is not)."""
    return 0o666 & ~_umask()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(folder: Path | str, recursive: bool = False) -> list[Path]:
    """Delete temporary files left in ``folder`` by interrupted :func:`atomic_write` calls.

    A temporary file is stale when the process that wrote it is gone (its pid is in the name), or
    when it predates pids in the names. Returns the removed paths; never raises for a file that
    cannot be removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    candidates = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for path in candidates:
        match = _TEMP_NAME.match(path.name)
        if match is None or not path.is_file() or path.is_symlink():
            continue
        pid = match.group("pid")
        if pid is not None and _pid_alive(int(pid)):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_text(data: Any) -> str:
    """Strict JSON text: NaN and infinities become null (Python would write ``NaN``, which browsers
    and most JSON readers reject). ASCII only: file names that are not valid UTF-8 survive as
    ``\\udcXX`` escapes and read back to the same name."""
    return json.dumps(
        _finite(data), indent=2, sort_keys=True, default=_json_default, allow_nan=False, ensure_ascii=True
    )


def atomic_write_json(path: Path, data: Any) -> None:
    """Write strict JSON (see :func:`json_text`) atomically."""
    atomic_write_text(path, json_text(data) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return _finite(value.tolist())
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def display_name(path: Path | str | bytes) -> str:
    """A path as text that any terminal, CSV, JSON or HTML file can hold.

    Linux file names are bytes; Python maps bytes that are not UTF-8 to lone surrogates, which
    cannot be encoded for output. They are shown as ``\\xNN`` escapes here (``bad\\xff.jpg``), so
    messages still name the file unambiguously.
    """
    if isinstance(path, bytes):
        return path.decode("utf-8", "backslashreplace")
    return _escape_surrogates(str(path), "\\x{:02x}", "\\u{:04x}")


def safe_stem(stem: str) -> str:
    """A file stem usable for output files and links: undecodable bytes become ``%XX``."""
    return _escape_surrogates(stem, "%{:02X}", "%u{:04X}")


def _escape_surrogates(text: str, byte_format: str, other_format: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(byte_format.format(code - 0xDC00))
        elif 0xD800 <= code <= 0xDFFF:
            out.append(other_format.format(code))
        else:
            out.append(char)
    return "".join(out)
