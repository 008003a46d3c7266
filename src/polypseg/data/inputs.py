"""One rule for bad inputs, shared by ``polypseg predict`` and ``polypseg explain``.

* Every input that cannot be used is **skipped and named**, with its real cause (not found, a broken
  symlink, a symlink loop, permission denied, not a regular file, not an image by extension, cannot
  be decoded, too many pixels, ...), as one ``warning:`` line, and listed in ``skipped.csv``.
* The command goes on with the others; it exits non-zero only when nothing was produced.
* It ends with one line counting what was done and what was skipped, by cause.
* Names are shown with :func:`polypseg.core.io_utils.display_name` (a file name that is not UTF-8 is
  printed with ``\\xNN`` escapes) and outputs are named with :func:`polypseg.core.io_utils.safe_stem`.
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import numpy as np

from polypseg.core.io_utils import atomic_write_text, display_name

# Largest image predict and explain accept (the web API's default too): 40 megapixels, e.g.
# 7300 x 5470. Work happens at the model's resolution; what is written at full size costs about
# 7.5 bytes per pixel at peak in predict and 7 in explain (docs/guarantees.md, "Limits and memory"),
# so this bounds that part of the memory near 0.3 GB.
MAX_INPUT_PIXELS = 40_000_000
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".webm")

# causes (the closing line counts them, most frequent first: SkipLog.counts)
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


def _listing_problem(folder: Path, error: OSError) -> tuple[Path, InputProblem]:
    cause = NO_PERMISSION if error.errno in (errno.EACCES, errno.EPERM) else NOT_FOUND
    return folder, InputProblem(cause, f"{display_name(folder)}: cannot list the folder ({error.strerror or error})")


def list_folder(
    folder: Path, recursive: bool = False, exclude: Path | None = None
) -> tuple[list[Path], list[tuple[Path, InputProblem]]]:
    """Entries of ``folder`` (sorted; hidden names left out) and the folders that could not be listed.

    With ``recursive`` sub-folders are entered (symlinked ones are listed, not entered), and a
    sub-folder that cannot be read is reported, never passed over. Nothing under ``exclude`` (the
    command's output folder) is listed: a second run must not take the first one's outputs as inputs.
    """
    problems: list[tuple[Path, InputProblem]] = []
    excluded = exclude.resolve() if exclude is not None else None
    try:
        if not recursive:
            entries = list(folder.iterdir())
        else:
            entries = []
            for parent, dirs, files in os.walk(
                folder, onerror=lambda e: problems.append(_listing_problem(Path(e.filename), e))
            ):
                here = Path(parent)
                if excluded is not None and here.resolve() == excluded:
                    dirs[:] = []
                    continue
                entries += [here / name for name in dirs + files]
    except OSError as error:
        return [], [_listing_problem(folder, error)]
    if excluded is not None:
        entries = [p for p in entries if p.resolve() != excluded]
    if problems and problems[0][0] == folder:  # the folder itself: as before, one problem, no entries
        return [], problems[:1]
    return sorted(p for p in entries if not p.name.startswith(".")), problems


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

    def skip(
        self, path: Path | str, problem: InputProblem | str, cause: str = FAILED, consequence: str = "skipped"
    ) -> None:
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
        """``path`` lists the skipped inputs; with none skipped, an earlier run's list there is removed."""
        columns = ("file", "cause", "reason")
        write_csv_if_any(path, columns, [dict(zip(columns, entry, strict=False)) for entry in self.entries])


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


def check_output_path(path: Path, label: str, folder: bool = False) -> None:
    """Before any work, creating nothing: a one-line error naming ``label`` when ``path`` cannot
    become a file (``folder=False``) or a folder: the other kind is already there, or a file stands
    where one of its parent folders should be."""
    from polypseg.errors import PolypsegError

    name = display_name(path)
    if folder and path.exists() and not path.is_dir():
        raise PolypsegError(f"{label} {name}: is an existing file, not a folder; choose a folder for the outputs")
    if not folder and path.is_dir():
        raise PolypsegError(f"{label} {name}: is a folder; give a file name")
    for parent in path.parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise PolypsegError(f"{label} {name}: {display_name(parent)} is a file, not a folder")


@contextlib.contextmanager
def one_line_warnings(warn: Callable[[str], None]) -> Iterator[None]:
    """Show Python warnings raised inside as one ``warning:`` line each, not ``file:line: UserWarning``;
    matplotlib's missing-glyph warnings (a file name in a script its font lacks) are dropped."""

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().splitlines()
        warn(display_name(text[0] if text else category.__name__))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", message=r"(?s).*Glyph .* missing from")
        warnings.filterwarnings("ignore", message=r"(?s).*[Mm]atplotlib currently does not support")
        warnings.showwarning = show
        yield


def unique_names(stems: Iterable[str]) -> list[str]:
    """Output names for ``stems``: safe for any file system and distinct (``x``, ``x-2``, ...).

    Distinct ignoring case too: ``IMG_1`` and ``img_1`` are one file on macOS and Windows.
    """
    from polypseg.core.io_utils import safe_stem

    used: set[str] = set()
    names = []
    for stem in stems:
        base = safe_stem(stem) or "image"
        name, n = base, 1
        while name.casefold() in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name.casefold())
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Collecting inputs: the one rule for predict and explain


@dataclass
class InputFile:
    """One input to process: its file, its output name and, for explain, its ground truth."""

    path: Path
    name: str  # output file stem: unique within the run and safe for any file system
    video: bool = False
    mask: Path | None = None
    mask_source: str = ""  # how the mask was found: "dataset", "layout", "--masks"


def is_video(path: Path | str) -> bool:
    """A video file by extension (:data:`VIDEO_EXTENSIONS`)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    members, _ = list_folder(folder)
    return {p.stem: p for p in members if _wanted(p, videos=False, member=True) and p.is_file()}


def _sibling_masks(images_dir: Path) -> Path | None:
    """The masks folder beside an images folder in a known dataset layout (``images/`` + ``masks/``)."""
    from polypseg.data.pairing import LAYOUTS

    for images_name, masks_name in LAYOUTS:
        if images_dir.name == images_name and (images_dir.parent / masks_name).is_dir():
            return images_dir.parent / masks_name
    return None


def collect_inputs(
    inputs: Iterable[Path],
    skips: SkipLog,
    *,
    videos: bool = False,
    recursive: bool | None = None,
    ground_truth: bool = False,
    masks: Path | None = None,
    notify: Callable[[str], None] | None = None,
    exclude: Path | None = None,
) -> list[InputFile]:
    """Files and folders -> the inputs to process, each with a unique output name.

    The one behaviour of ``polypseg predict`` and ``polypseg explain``:

    * **Missing and unusable paths** (not found, broken symlink, symlink loop, permission denied,
      not a regular file) are never raised: each is skipped into ``skips`` with its cause, and the
      others go on. A file given directly must be an image (or, with ``videos``, a video) by
      extension, else it is skipped as ``not an image file``.
    * **Folders** give their image (and video) files; other files and hidden files (``.name``)
      are ignored. With ``recursive=True`` sub-folders are entered; otherwise a sub-folder named
      like an image is skipped as ``not a regular file``, and ``recursive=False`` (recursion
      offered but not asked) hints at it when a folder gives nothing. A folder that gives nothing and had no
      problem of its own is skipped as ``empty folder``. A sub-folder that cannot be listed and
      a file in an image format polypseg does not read (GIF, ...) are skipped and named too.
    * **Outputs are not inputs**: nothing under ``exclude`` (the command's ``--out``) is taken.
    * **Name clashes**: outputs are named by file stem, made safe and distinct in input order
      (``x``, ``x-2``, ``x-3``, ...; :func:`unique_names`); the CSV files map each name to its file.
    * **Ground truth** (``ground_truth=True``): a dataset root (``images/`` + ``masks/``) gives
      its pairs; then masks come from ``masks`` matched by stem, or else from the ``masks/``
      beside an ``images/`` folder. An image without a mask is kept (without ground truth);
      ``notify`` hears how masks were found, ``skips.warn`` what is missing.
    """
    from polypseg.errors import PolypsegError

    found: list[InputFile] = []
    for path in inputs:
        found += _given_inputs(
            path, skips, videos=videos, recursive=recursive, ground_truth=ground_truth, exclude=exclude
        )
    if ground_truth:
        _match_masks(found, masks, skips.warn, notify)
    elif masks is not None:
        raise PolypsegError("masks apply to ground_truth=True only")
    for item, name in zip(found, unique_names(item.name for item in found), strict=False):
        item.name = name
    return found


def _wanted(path: Path, videos: bool, member: bool) -> bool:
    """An image (or, with ``videos``, a video) by extension; hidden files in folders are not inputs."""
    from polypseg.data.pairing import IMAGE_EXTENSIONS

    if member and path.name.startswith("."):
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS or (videos and is_video(path))


def _kind(videos: bool) -> str:
    """What an input may be, for messages."""
    return "image or video" if videos else "image"


def _given_inputs(
    path: Path, skips: SkipLog, *, videos: bool, recursive: bool | None, ground_truth: bool, exclude: Path | None
) -> list[InputFile]:
    """What one given path stands for: itself (a file), its pairs (a dataset root, with ``ground_truth``)
    or its members (any other folder). A path that cannot be used is skipped into ``skips``."""
    problem = path_problem(path)
    if problem is not None:
        skips.skip(path, problem)
        return []
    if not path.is_dir():
        if _wanted(path, videos, member=False):
            return [InputFile(path, path.stem, videos and is_video(path))]
        detail = f"{display_name(path)}: not an {_kind(videos)} file (by extension)"
        skips.skip(path, InputProblem(NOT_IMAGE, detail))
        return []
    images_dir = _dataset_images(path) if ground_truth else None
    if images_dir is not None:
        return _dataset_inputs(path, images_dir, skips)
    return _folder_inputs(path, skips, videos=videos, recursive=recursive, exclude=exclude)


def _dataset_images(folder: Path) -> Path | None:
    """The images folder of a dataset root (``images/`` + ``masks/``), or None for any other folder."""
    from polypseg.data.images import DataError
    from polypseg.data.pairing import find_layout

    try:
        return find_layout(folder)[0]
    except DataError:
        return None


def _folder_inputs(
    folder: Path, skips: SkipLog, *, videos: bool, recursive: bool | None, exclude: Path | None
) -> list[InputFile]:
    """A folder's image (and video) files; what cannot be used, and a folder that gives nothing, is skipped."""
    members, problems = list_folder(folder, bool(recursive), exclude=exclude)
    for unlisted, problem in problems:
        skips.skip(unlisted, problem)
    found = [item for member in members if (item := _member_input(member, skips, videos, recursive)) is not None]
    if not found and not problems:
        hint = " (use --recursive for sub-folders)" if recursive is False else ""
        detail = f"{display_name(folder)}: no {_kind(videos)} files in this folder{hint}"
        skips.skip(folder, InputProblem(EMPTY_FOLDER, detail))
    return found


def _member_input(member: Path, skips: SkipLog, videos: bool, recursive: bool | None) -> InputFile | None:
    """One folder member as an input, or None: skipped and named when it cannot be used, passed over
    silently when it is not an input at all (a text file, a hidden file)."""
    from polypseg.data.pairing import unsupported_format

    what = _kind(videos)
    if not _wanted(member, videos, member=True):
        reason = None if member.name.startswith(".") else unsupported_format(member)
        if reason is not None:  # an image in a format polypseg does not read: named, as when given directly
            skips.skip(member, InputProblem(NOT_IMAGE, f"{display_name(member)}: not an {what} file ({reason})"))
        return None
    trouble = path_problem(member)
    if trouble is not None:
        skips.skip(member, trouble)
    elif member.is_dir():
        if not recursive:
            skips.skip(member, InputProblem(NOT_REGULAR, f"{display_name(member)}: a folder named like an {what} file"))
    else:
        return InputFile(member, member.stem, videos and is_video(member))
    return None


def _dataset_inputs(root: Path, images_dir: Path, skips: SkipLog) -> list[InputFile]:
    from polypseg.data.pairing import index_dataset

    index = index_dataset(root)
    for rejected, reason in index.rejected:
        if rejected.parent == images_dir:
            cause = (
                BROKEN_LINK
                if "broken symlink" in reason
                else LINK_LOOP
                if "loop" in reason
                else NOT_IMAGE
                if "format" in reason
                else NOT_REGULAR
            )
            skips.skip(rejected, InputProblem(cause, f"{display_name(rejected)}: {reason}"))
        else:
            skips.warn(f"{rejected}: {reason}; its image is explained without ground truth")
    items = [InputFile(s.image, s.stem, mask=s.mask, mask_source="dataset") for s in index.samples]
    return items + [InputFile(p, p.stem) for p in index.unpaired_images]


def _match_masks(
    items: list[InputFile], masks: Path | None, warn: Callable[[str], None], notify: Callable[[str], None] | None
) -> None:
    from polypseg.errors import PolypsegError

    if masks is not None:
        if not masks.is_dir():
            raise PolypsegError(f"--masks {display_name(masks)}: not a folder")
        by_stem = _masks_by_stem(masks)
        for item in items:
            if item.mask is None:
                item.mask = by_stem.get(item.path.stem)
                item.mask_source = "--masks" if item.mask is not None else ""
                if item.mask is None:
                    warn(f"{item.path}: no mask named '{item.path.stem}.*' in {masks}; no ground truth for it")
        return
    layouts: dict[Path, dict[str, Path]] = {}
    for item in items:
        if item.mask is None:
            sibling = _sibling_masks(item.path.parent)
            if sibling is not None:
                table = layouts.setdefault(sibling, _masks_by_stem(sibling))
                item.mask = table.get(item.path.stem)
                item.mask_source = "layout" if item.mask is not None else ""
    for sibling in layouts:
        used = sum(
            1
            for item in items
            if item.mask_source == "layout" and item.mask is not None and item.mask.parent == sibling
        )
        if used and notify is not None:
            notify(
                f"ground truth for {used} image(s) found by the dataset layout in {sibling} (images/ + masks/, same stem)"
            )


def write_csv(path: Path, columns: Iterable[str], rows: Iterable[dict[str, Any]]) -> None:
    """The one CSV writer for outputs: a header, one row per dict (missing keys empty, extra keys left out),
    floats as they come (format them first where wanted), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def write_csv_if_any(path: Path, columns: Iterable[str], rows: Sequence[dict[str, Any]]) -> None:
    """:func:`write_csv` when there are ``rows``; else remove the table an earlier run left at ``path``,
    so that every table in an output folder is this run's."""
    if rows:
        write_csv(path, columns, rows)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# In-memory inputs: arrays, PIL images and paths as RGB uint8

ImageInput = Union["np.ndarray", "PIL.Image.Image", str, Path]  # noqa: F821


def to_rgb_uint8(array: np.ndarray, name: str = "array") -> np.ndarray:
    """Grayscale, RGBA, 16-bit or float ``[0, 1]`` arrays -> ``uint8 (H, W, 3)`` (as :func:`polypseg.data.images.read_image`)."""
    import numpy as np

    from polypseg.data.images import ImageReadError, to_uint8

    array = np.asarray(array)
    if array.dtype.kind == "i" and array.dtype.itemsize > 2:
        # Wide signed integers are either PIL "I" mode (16-bit data) or numpy arithmetic on 8-bit
        # pixels (np.array of a list is int64): values that all fit in 0-255 are read as 8-bit, or
        # they would be scaled as 16-bit into a black image.
        if array.size and 0 <= int(array.min()) and int(array.max()) <= 255:
            array = array.astype(np.uint8)
        else:
            array = np.clip(array, 0, 65535).astype(np.uint16)
    try:
        array = to_uint8(array)
    except ImageReadError as error:
        raise ImageReadError(f"cannot use {name}: {error}") from None
    if array.ndim == 3 and array.shape[2] in (1, 2):
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]  # endoscopy frames carry no meaningful transparency
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ImageReadError(f"cannot use {name}: unexpected image shape {array.shape}")
    return np.ascontiguousarray(array)


def load_input(item: ImageInput, index: int = 0) -> tuple[np.ndarray, str]:
    """An input as ``(uint8 RGB (H, W, 3), name)``; raises :class:`polypseg.data.images.ImageReadError` naming it."""
    import numpy as np

    from polypseg.data.images import read_image

    if isinstance(item, (str, Path)):
        return read_image(item), str(item)
    if is_pil(item):
        name = getattr(item, "filename", "") or f"image {index}"
        image = item
        if image.mode not in ("RGB", "RGBA", "L", "I;16", "I;16B", "I;16L", "I", "F"):
            image = image.convert("RGBA" if image.mode in ("LA", "PA") else "RGB")
        return to_rgb_uint8(np.asarray(image), name), name
    if isinstance(item, np.ndarray):
        return to_rgb_uint8(item, f"array {index}"), f"array {index}"
    raise TypeError(f"unsupported input type {type(item).__name__}; pass a path, a PIL image or a numpy array")


def is_pil(item: Any) -> bool:
    """A PIL image (PIL is imported only when asked)."""
    from PIL import Image

    return isinstance(item, Image.Image)
