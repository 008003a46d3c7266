"""One rule for bad inputs, shared by ``polypseg predict`` and ``polypseg explain``.

* Every input that cannot be used is **skipped and named**, with its real cause (not found, a broken
  symlink, a symlink loop, permission denied, not a regular file, not an image by extension, cannot
  be decoded, too many pixels, ...), as one ``warning:`` line, and listed in ``skipped.csv``.
* The command goes on with the others; it exits non-zero only when nothing was produced.
* It ends with one line counting what was done and what was skipped, by cause.
* Names are shown with :func:`polypseg.io_utils.display_name` (a file name that is not UTF-8 is
  printed with ``\\xNN`` escapes) and outputs are named with :func:`polypseg.io_utils.safe_stem`.
* Images are refused above :data:`MAX_INPUT_PIXELS` from their header, before decoding.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import stat
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from polypseg.io_utils import atomic_write_text, display_name

# Largest image predict and explain accept (the web API's default too): 40 megapixels, e.g.
# 7300 x 5470. Work happens at the model's resolution; what is written at full size costs about
# 10 bytes per pixel at peak in predict (docs/guarantees.md), so this bounds memory near 0.5 GB.
MAX_INPUT_PIXELS = 40_000_000

# causes, in the order the closing line lists them
NOT_FOUND = "not found"
BROKEN_LINK = "broken symlink"
LINK_LOOP = "symlink loop"
NO_PERMISSION = "permission denied"
NOT_REGULAR = "not a regular file"
NOT_IMAGE = "not an image file"
EMPTY_FOLDER = "empty folder"
UNREADABLE = "cannot be decoded"
TOO_LARGE = "too many pixels"
FAILED = "failed"


class InputProblem(Exception):
    """Why one input cannot be used: ``cause`` (a short category) and a one-line ``detail``."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


def path_problem(path: Path) -> InputProblem | None:
    """The reason ``path`` cannot be opened as an input file or folder, or None."""
    name = display_name(path)
    try:
        info = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        if os.path.islink(path):
            target = display_name(os.readlink(path))
            return InputProblem(BROKEN_LINK, f"{name}: broken symlink (its target {target} does not exist)")
        return InputProblem(NOT_FOUND, f"{name}: not found")
    except OSError as error:
        if error.errno == errno.ELOOP:
            return InputProblem(LINK_LOOP, f"{name}: symlink loop (the link points back to itself)")
        if error.errno in (errno.EACCES, errno.EPERM):
            return InputProblem(NO_PERMISSION, f"{name}: permission denied")
        if error.errno == errno.ENOTDIR:
            return InputProblem(NOT_FOUND, f"{name}: not found (a part of the path is a file, not a folder)")
        return InputProblem(NOT_FOUND, f"{name}: {error.strerror or error}")
    if stat.S_ISDIR(info.st_mode):
        if not os.access(path, os.R_OK | os.X_OK):
            return InputProblem(NO_PERMISSION, f"{name}: permission denied (folder)")
        return None
    if not stat.S_ISREG(info.st_mode):
        return InputProblem(NOT_REGULAR, f"{name}: not a regular file (a device, pipe or socket)")
    if not os.access(path, os.R_OK):
        return InputProblem(NO_PERMISSION, f"{name}: permission denied")
    return None


def list_folder(folder: Path, recursive: bool = False) -> tuple[list[Path], list[InputProblem]]:
    """Entries of ``folder`` (sorted; hidden names left out) and problems met while listing."""
    problems: list[InputProblem] = []
    try:
        entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    except OSError as error:
        cause = NO_PERMISSION if error.errno in (errno.EACCES, errno.EPERM) else NOT_FOUND
        return [], [InputProblem(cause, f"{display_name(folder)}: cannot list the folder ({error.strerror or error})")]
    return [p for p in entries if not p.name.startswith(".")], problems


def image_header_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from an image file's header, without decoding the pixels."""
    from PIL import Image

    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            shape = tif.pages[0].shape
        if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
            shape = shape[1:]
        return int(shape[1]), int(shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: the limit is checked here
        with Image.open(path) as image:
            return image.size


def check_pixels(path: Path, limit: int = MAX_INPUT_PIXELS) -> None:
    """Raise :class:`InputProblem` if the header declares more than ``limit`` pixels (or is unreadable)."""
    from PIL import Image

    name = display_name(path)
    try:
        width, height = image_header_size(path)
    except Image.DecompressionBombError:
        raise InputProblem(TOO_LARGE, f"{name}: the header declares far more than {limit:,} pixels") from None
    except Exception as error:  # noqa: BLE001 - the decoder says what is wrong; the full read will too
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputProblem(UNREADABLE, f"cannot decode {name}: {display_name(reason)}") from None
    if width < 1 or height < 1:
        raise InputProblem(UNREADABLE, f"cannot decode {name}: its header gives an empty image ({width}x{height})")
    if width * height > limit:
        raise InputProblem(
            TOO_LARGE,
            f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of {limit:,} (docs/guarantees.md)",
        )


@dataclass
class SkipLog:
    """Skipped inputs with their causes; each is reported once, as it happens, through ``warn``."""

    warn: Callable[[str], None]
    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (name, cause, detail)

    def skip(self, path: Path | str, problem: InputProblem | str, cause: str = FAILED, consequence: str = "skipped") -> None:
        if isinstance(problem, InputProblem):
            cause, detail = problem.cause, problem.detail
        else:
            detail = display_name(problem)
        self.entries.append((display_name(path), cause, detail))
        self.warn(f"{detail}; {consequence}")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.entries]

    def counts(self) -> str:
        """``2 not found, 1 cannot be decoded``; '' when nothing was skipped."""
        return ", ".join(f"{n} {cause}" for cause, n in Counter(cause for _, cause, _ in self.entries).most_common())

    def closing(self, done: str, out: Path) -> str:
        """The last line: what was done, what was skipped and why, where the outputs are."""
        line = done
        if self.entries:
            line += f"; {len(self.entries)} input(s) skipped ({self.counts()}; listed in skipped.csv)"
        return f"{line}; outputs in {display_name(out)}"

    def write_csv(self, path: Path) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(("file", "cause", "reason"))
        writer.writerows(self.entries)
        atomic_write_text(path, buffer.getvalue())


def prepare_output_folder(out: Path, label: str = "--out") -> None:
    """Create ``out`` or raise a one-line error naming it (a file there, no permission, ...)."""
    from polypseg.errors import PolypsegError

    name = display_name(out)
    if out.exists() and not out.is_dir():
        raise PolypsegError(f"{label} {name}: is an existing file, not a folder; choose a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PolypsegError(f"{label} {name}: a part of the path is an existing file, not a folder") from None
    except OSError as error:
        raise PolypsegError(f"{label} {name}: cannot create the folder ({error.strerror or error})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PolypsegError(f"{label} {name}: permission denied (cannot write there)")


@contextlib.contextmanager
def one_line_warnings(warn: Callable[[str], None]) -> Iterator[None]:
    """Show Python warnings raised inside as one ``warning:`` line each, not ``file:line: UserWarning``;
    matplotlib's missing-glyph warnings (a file name in a script its font lacks) are dropped."""

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ARG001
        text = str(message).strip().splitlines()
        warn(display_name(text[0] if text else category.__name__))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", message=r"(?s).*Glyph .* missing from")
        warnings.filterwarnings("ignore", message=r"(?s).*[Mm]atplotlib currently does not support")
        warnings.showwarning = show
        yield


def unique_names(stems: Iterable[str]) -> list[str]:
    """Output names for ``stems``: safe for any file system and distinct (``x``, ``x-2``, ...)."""
    from polypseg.io_utils import safe_stem

    used: set[str] = set()
    names = []
    for stem in stems:
        base = safe_stem(stem) or "image"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        names.append(name)
    return names
