"""Reading polyp datasets as published, checking them, and a compact preprocessed cache.

Layouts understood (pairs are always matched by file stem, never by sorted order):

* Kvasir-SEG and any generic folder: ``images/`` + ``masks/`` (jpg, png, bmp, tif...).
* CVC-ClinicDB: ``Original/`` + ``Ground Truth/`` (TIFF; Pillow cannot open these, tifffile can).

Masks are reduced to one channel and binarised at ``> 127`` at their original resolution;
resizing a mask is always nearest-neighbour, so it stays binary.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from polypseg.core.io_utils import atomic_write, display_name, remove_stale_temps
from polypseg.errors import PolypsegError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
MIN_CHECK_SIDE = 32  # `data check` warns about images smaller than this on a side
LAYOUTS = (("images", "masks"), ("Original", "Ground Truth"))
CACHE_FORMAT = "polypseg-cache-v1"
log = logging.getLogger(__name__)
# Large enough for any colonoscopy frame, small enough to stop decompression bombs.
Image.MAX_IMAGE_PIXELS = 100_000_000


class DataError(PolypsegError):
    """A dataset folder or file cannot be used; the message names the path."""


class ImageReadError(DataError):
    """One image or mask file cannot be decoded."""


@dataclass(frozen=True)
class Sample:
    stem: str
    image: Path
    mask: Path | None = None


@dataclass
class DatasetIndex:
    """The pairs found under a dataset root, plus the files that could not be paired."""

    root: Path
    samples: list[Sample]
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_masks: list[Path] = field(default_factory=list)
    duplicate_stems: list[Path] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # (path, why it cannot be used)

    @property
    def stems(self) -> list[str]:
        return [s.stem for s in self.samples]


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Any integer, bool or float pixel array -> uint8, scaled by the dtype's range (never per image)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit (or wider) data: scale by the dtype's range, not per image, so a fixed
        # threshold means the same thing for every file.
        max_value = np.iinfo(array.dtype).max
        return (array.astype(np.float64) * (255.0 / max_value)).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(array)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
    raise ImageReadError(f"unsupported pixel type {array.dtype}")


def pil_pixels(image: Image.Image) -> np.ndarray:
    """A loaded Pillow image's pixels in a form the rules below read: palette, CMYK, YCbCr, LAB, HSV
    to RGB(A), 1-bit and float to 8-bit gray, 16- and 32-bit integer gray to uint16.

    The one place that reads Pillow modes: files (:func:`read_image`, :func:`read_mask`) and the web
    app's uploads both decode through it, so the two can never read one image differently."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "I" or image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.uint16 if image.mode.startswith("I;16") else np.int64)
        if array.dtype == np.int64:
            array = np.clip(array, 0, 65535).astype(np.uint16)
        return array
    elif image.mode in ("1", "F"):
        image = image.convert("L")
    elif image.mode == "LA":
        image = image.convert("RGBA")
    elif image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    return np.asarray(image)


def planar_to_last(array: np.ndarray) -> np.ndarray:
    """A planar TIFF's ``(C, H, W)`` pixels as ``(H, W, C)``; other arrays unchanged."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    return array


def _decode(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as image:
                image.load()
                array = pil_pixels(image)
    except FileNotFoundError:
        raise ImageReadError(f"file not found: {path}") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure means this file is unusable
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageReadError(f"cannot decode {path}: {reason}") from None
    return planar_to_last(array)


def read_image(path: Path | str) -> np.ndarray:
    """Read an image as ``uint8`` RGB ``(H, W, 3)``; grayscale, RGBA and 16-bit are converted."""
    path = Path(path)
    return image_rgb(_decode(path), str(path))


def image_rgb(pixels: np.ndarray, name: str) -> np.ndarray:
    """Decoded image pixels as ``uint8`` RGB ``(H, W, 3)`` (the rule for every image polypseg reads)."""
    array = to_uint8(pixels)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]  # colonoscopy frames have no meaningful transparency
    elif array.ndim == 3 and array.shape[2] == 2:
        array = np.repeat(array[:, :, :1], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ImageReadError(f"cannot use {name}: unexpected image shape {array.shape}")
    return np.ascontiguousarray(array)


LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def _mask_uint8(path: Path) -> np.ndarray:
    """A mask file's pixels as uint8 0-255, label maps read by their values (see :func:`read_mask`)."""
    return mask_uint8(_decode(path), lossy=path.suffix.lower() in LOSSY_SUFFIXES)


def mask_uint8(raw: np.ndarray, lossy: bool) -> np.ndarray:
    """Decoded mask pixels as uint8 0-255, label maps read by their values (see :func:`read_mask`).

    ``lossy``: the pixels came from a JPEG, where a 1 is compression noise, not a label."""
    if np.issubdtype(raw.dtype, np.integer) and raw.size:
        peak = int(raw.max())
        if peak == 1 and not lossy:
            return raw.astype(np.uint8) * 255
        if raw.dtype.itemsize > 1 and 1 < peak <= 255:
            return raw.astype(np.uint8)
    return to_uint8(raw)


def read_mask(path: Path | str) -> np.ndarray:
    """Read a mask as ``bool (H, W)``: one channel (max over colour channels), binarised at > 127.

    Label maps are read by their values, not their dtype's range: a lossless 0/1 mask (PNG, TIFF)
    is foreground where 1, and a 16-bit file holding 0/255 is read as 8-bit. Scaling either by its
    dtype would make every mask empty, and a model trained on them would score a perfect Dice.
    JPEG masks keep the > 127 rule: compression noise near 0 must not become foreground.
    """
    path = Path(path)
    return mask_foreground(_mask_uint8(path), f"mask {path}")


def mask_foreground(pixels: np.ndarray, name: str) -> np.ndarray:
    """Mask pixels (uint8 0-255, from :func:`mask_uint8`) as ``bool (H, W)``: max over colour, > 127."""
    array = pixels
    if array.ndim == 3:
        array = array[:, :, :3].max(axis=2) if array.shape[2] >= 3 else array[:, :, 0]
    if array.ndim != 2:
        raise ImageReadError(f"cannot use {name}: unexpected shape {array.shape}")
    return array > 127


def _list_images(folder: Path, rejected: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Image files in ``folder``; with ``rejected``, the entries that look like data but cannot be
    used are collected there with their real cause (format, broken symlink, loop, folder, ...)."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        suffix = p.suffix.lower()
        if suffix in IMAGE_EXTENSIONS and p.is_file():
            found.append(p)
        elif rejected is not None:
            reason = _why_unusable(p)
            if reason is not None:
                rejected.append((p, reason))
    return found


_KNOWN_UNSUPPORTED = {
    ".gif": "GIF",
    ".jfif": "JFIF",
    ".heic": "HEIC",
    ".svg": "SVG",
    ".ppm": "PPM",
    ".jp2": "JPEG 2000",
}


def _why_unusable(path: Path) -> str | None:
    """Why an entry of an images/masks folder is not used, or None for unrelated files (notes, ...)."""
    import errno
    import os

    suffix = path.suffix.lower()
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symlink (its target {display_name(os.readlink(path))} does not exist)"
        return "vanished while listing"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink loop"
        return error.strerror or str(error)
    import stat as _stat

    if _stat.S_ISDIR(info.st_mode):
        return "a folder, not an image file" if suffix in IMAGE_EXTENSIONS else None
    if not _stat.S_ISREG(info.st_mode):
        return "not a regular file"
    return unsupported_format(path)


def unsupported_format(path: Path) -> str | None:
    """Why a file named like an image in a format polypseg does not read (GIF, HEIC, ...) is not used,
    or None. The one rule for datasets (``data check``, training) and for folders given to predict and explain."""
    suffix = path.suffix.lower()
    if suffix in _KNOWN_UNSUPPORTED:
        return f"{_KNOWN_UNSUPPORTED[suffix]} is not a supported format (use {', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})"
    return None


def find_layout(root: Path) -> tuple[Path, Path]:
    """Return the ``(images, masks)`` folders of a dataset root, or raise :class:`DataError`."""
    root = Path(root)
    if not root.is_dir():
        if root.exists():
            raise DataError(f"{root} is a file, not a dataset folder (images/ + masks/)")
        raise DataError(f"dataset folder not found: {root}")
    for images_name, masks_name in LAYOUTS:
        if (root / images_name).is_dir() and (root / masks_name).is_dir():
            return root / images_name, root / masks_name
    for images_name, masks_name in LAYOUTS:  # half a layout: name the part that is wrong
        present = [name for name in (images_name, masks_name) if (root / name).exists() or (root / name).is_symlink()]
        if present:
            for name in (images_name, masks_name):
                if not (root / name).exists() and not (root / name).is_symlink():
                    raise DataError(f"{root / name} is missing (a dataset needs '{images_name}/' and '{masks_name}/')")
                if not (root / name).is_dir():
                    raise DataError(
                        f"{root / name} is not a folder (a dataset needs '{images_name}/' and '{masks_name}/' folders)"
                    )
    # A download unpacks into one sub-folder (e.g. Kvasir-SEG/): accept that too.
    children = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if len(children) == 1:
        return find_layout(children[0])
    expected = " or ".join(f"'{i}/' + '{m}/'" for i, m in LAYOUTS)
    raise DataError(f"{root} has no {expected} folders")


def index_dataset(root: Path | str) -> DatasetIndex:
    """Pair images and masks under ``root`` by file stem."""
    root = Path(root)
    images_dir, masks_dir = find_layout(root)
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    duplicates: list[Path] = []
    rejected: list[tuple[Path, str]] = []
    for folder, table in ((images_dir, images), (masks_dir, masks)):
        for path in _list_images(folder, rejected):
            if path.stem in table:
                duplicates.append(path)
            else:
                table[path.stem] = path
    samples = [Sample(stem, images[stem], masks[stem]) for stem in sorted(images) if stem in masks]
    return DatasetIndex(
        root=root,
        samples=samples,
        unpaired_images=[images[s] for s in sorted(images) if s not in masks],
        unpaired_masks=[masks[s] for s in sorted(masks) if s not in images],
        duplicate_stems=duplicates,
        rejected=rejected,
    )


def load_split_file(path: Path | str) -> list[str]:
    """Read a list of stems (one per line, ``#`` comments allowed)."""
    lines = Path(path).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


# --------------------------------------------------------------------------------------------
# Dataset check


@dataclass
class Problem:
    severity: str  # "error" | "warning"
    kind: str
    path: Path
    message: str


@dataclass
class CheckReport:
    root: Path
    pairs: int = 0
    min_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    distinct_sizes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


def index_problems(index: DatasetIndex) -> list[Problem]:
    """What is wrong with a dataset before any file is decoded: entries that cannot be used (with
    their real cause), unpaired files, no pairs at all, duplicate stems. All are errors.

    The one rule for a dataset folder: ``data check`` reports these, and :func:`usable_index`
    (every command that trains or evaluates on a folder) refuses a dataset that has any.
    """
    problems: list[Problem] = []
    rejected_stems = {path.stem for path, _ in index.rejected}
    for path, reason in index.rejected:
        problems.append(Problem("error", "unusable", path, f"{display_name(path)}: {reason}"))
    for path in index.unpaired_images:
        why = " (its mask is unusable, see above)" if path.stem in rejected_stems else ""
        problems.append(
            Problem("error", "unpaired", path, f"{display_name(path)}: image has no mask with the same stem{why}")
        )
    for path in index.unpaired_masks:
        why = " (its image is unusable, see above)" if path.stem in rejected_stems else ""
        problems.append(
            Problem("error", "unpaired", path, f"{display_name(path)}: mask has no image with the same stem{why}")
        )
    if not index.samples:
        images_dir, masks_dir = find_layout(index.root)
        problems.append(
            Problem(
                "error",
                "no-pairs",
                index.root,
                f"{display_name(index.root)}: no image/mask pairs (matched by file stem in {images_dir.name}/ and {masks_dir.name}/)",
            )
        )
    for path in index.duplicate_stems:
        problems.append(Problem("error", "duplicate", path, f"{path}: another file has the same stem"))
    return problems


def usable_index(root: Path | str) -> DatasetIndex:
    """:func:`index_dataset`, refusing (one line) a dataset that ``polypseg data check`` reports errors for:
    training on the pairs that happen to work would silently leave files out (a GIF mask) or pick
    one of two files with the same stem."""
    index = index_dataset(root)
    errors = index_problems(index)
    if errors:
        more = f" ({len(errors)} errors in all)" if len(errors) > 1 else ""
        raise DataError(
            f"{display_name(index.root)} is not a usable dataset: {errors[0].message}{more}; "
            f"polypseg data check {display_name(index.root)} lists every problem"
        )
    return index


def check_dataset(root: Path | str, progress: bool = False) -> CheckReport:
    """Decode every pair and report problems, each naming its file.

    Errors (the dataset cannot be used as is): no pairs at all, unpaired files, files that cannot
    be used (with the real cause: an unsupported format such as GIF, a broken symlink, a symlink
    loop, a folder named like an image), duplicate stems, undecodable files, image/mask size
    mismatches. Warnings: empty masks, masks with values other than 0/255 (e.g. JPEG masks; they
    are binarised at > 127 when read), images under :data:`MIN_CHECK_SIDE` px on a side.
    """
    index = index_dataset(root)
    report = CheckReport(root=Path(root), pairs=len(index.samples))
    report.problems += index_problems(index)
    sizes: set[tuple[int, int]] = set()
    for sample in _progress(index.samples, progress, "checking"):
        try:
            image = read_image(sample.image)
        except ImageReadError as error:
            report.problems.append(Problem("error", "undecodable", sample.image, str(error)))
            continue
        assert sample.mask is not None
        try:
            raw = _mask_uint8(sample.mask)
        except ImageReadError as error:
            report.problems.append(Problem("error", "undecodable", sample.mask, str(error)))
            continue
        height, width = image.shape[:2]
        sizes.add((height, width))
        if min(height, width) < MIN_CHECK_SIDE:
            report.problems.append(
                Problem(
                    "warning",
                    "tiny-image",
                    sample.image,
                    f"{display_name(sample.image)}: only {width}x{height} pixels; it will be upscaled to the training size",
                )
            )
        if raw.shape[:2] != (height, width):
            report.problems.append(
                Problem(
                    "error",
                    "size-mismatch",
                    sample.mask,
                    f"{sample.mask}: mask is {raw.shape[1]}x{raw.shape[0]}, image is {width}x{height}",
                )
            )
            continue
        gray = raw[:, :, :3].max(axis=2) if raw.ndim == 3 else raw
        if not (gray > 127).any():
            report.problems.append(Problem("warning", "empty-mask", sample.mask, f"{sample.mask}: mask is empty"))
        off_values = int(np.count_nonzero((gray != 0) & (gray != 255)))
        if off_values:
            share = off_values / gray.size
            report.problems.append(
                Problem(
                    "warning",
                    "non-binary",
                    sample.mask,
                    f"{sample.mask}: {off_values} pixels ({share:.2%}) are neither 0 nor 255; binarised at > 127",
                )
            )
    if sizes:
        report.min_size = min(sizes, key=lambda s: s[0] * s[1])
        report.max_size = max(sizes, key=lambda s: s[0] * s[1])
        report.distinct_sizes = len(sizes)
    return report


def _progress(items: Sequence, enabled: bool, description: str) -> Iterable:
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)


# --------------------------------------------------------------------------------------------
# Preprocessed cache


@dataclass
class CachedData:
    """A dataset resized once to ``size x size``: images ``uint8 (N, S, S, 3)``, masks ``bool (N, S, S)``."""

    stems: list[str]
    images: np.ndarray
    masks: np.ndarray
    original_sizes: list[tuple[int, int]]
    size: int

    def subset(self, stems: Sequence[str]) -> CachedData:
        position = {s: i for i, s in enumerate(self.stems)}
        missing = [s for s in stems if s not in position]
        if missing:
            raise DataError(f"{len(missing)} stem(s) not in the dataset, e.g. '{missing[0]}'")
        rows = np.array([position[s] for s in stems], dtype=np.int64)
        return CachedData(
            stems=list(stems),
            images=self.images[rows],
            masks=self.masks[rows],
            original_sizes=[self.original_sizes[i] for i in rows],
            size=self.size,
        )


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB ``uint8`` image to ``size`` (int = square, or ``(height, width)``), antialiased."""
    height, width = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a binary mask with nearest-neighbour, so it stays binary."""
    height, width = (size, size) if isinstance(size, int) else size
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    return np.asarray(resized) > 127


def _samples_digest(samples: Sequence[Sample], prefix: str = "") -> str:
    """SHA-256 over the stems, file names and file contents of ``samples`` (not sizes or times:
    a file rewritten with other pixels and its old modification time restored is new content)."""
    digest = hashlib.sha256(prefix.encode())
    for sample in samples:
        for path in (sample.image, sample.mask):
            if path is None:
                continue
            digest.update(f"{sample.stem}|{path.name}|".encode("utf-8", "surrogateescape"))
            try:
                with open(path, "rb") as handle:
                    while block := handle.read(1 << 22):
                        digest.update(block)
            except OSError as error:
                raise DataError(f"cannot read {display_name(path)}: {error.strerror or error}") from None
    return digest.hexdigest()


# How masks are read is part of what a cache entry is made from: 0/1 and 16-bit label maps were read
# as empty before masks were read by their values, so entries made then must not be reused.
MASK_RULE = "mask-values-2"


def _cache_key(samples: Sequence[Sample], size: int) -> str:
    return _samples_digest(samples, f"{CACHE_FORMAT}:{MASK_RULE}:{size}")[:16]


def dataset_fingerprint(root: Path | str) -> str:
    """Content hash of a dataset folder's pairs, or of a cache ``.npz`` file's bytes."""
    root = Path(root)
    if root.is_file():
        digest = hashlib.sha256()
        with open(root, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        return digest.hexdigest()
    return _samples_digest(index_dataset(root).samples)


def default_cache_dir() -> Path:
    """``$POLYPSEG_CACHE``, else ``$XDG_CACHE_HOME/polypseg``, else ``~/.cache/polypseg``.

    Everything derived and re-creatable lives here (preprocessed data, ONNX exports), never in a
    user's run folder; every entry is named by the content hash of what it was made from.
    """
    import os

    if os.environ.get("POLYPSEG_CACHE"):
        return Path(os.environ["POLYPSEG_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is invalid and ignored
        return Path(xdg) / "polypseg"
    return Path.home() / ".cache" / "polypseg"


def build_cache(
    root: Path | str,
    size: int,
    cache_dir: Path | str | None = None,
    progress: bool = True,
) -> CachedData:
    """Load ``root`` resized to ``size`` from the cache, building the cache file on first use.

    ``root`` may also be a cache file itself (``.npz``), as written by ``polypseg data cache --out``.
    The cache is one ``.npz`` per (dataset content, size): images stored as JPEG (quality 95)
    bytes and masks as packed bits, about 30 MB for all of Kvasir-SEG at 256 px, so it can be
    copied to a GPU machine. It is decoded into memory once per process; training then never
    touches the disk. The key is the SHA-256 of the files' names and contents (plus the size), so
    changed pixels always rebuild it, whatever the files' modification times say.
    """
    if Path(root).is_file() and Path(root).suffix == ".npz":
        # A cache file given directly (e.g. carried to a GPU machine without the raw images).
        try:
            cached = load_cache(root)
        except DataError as error:
            raise DataError(
                f"{error}; make it again from the images with: polypseg data cache DATASET --size {size} --out {root}"
            ) from None
        if cached.size != size:
            raise DataError(
                f"{root} holds {cached.size}px images, but {size}px are needed; rebuild it with --size {size}"
            )
        return cached
    index = usable_index(root)  # what data check calls an error is never trained on
    path = _cache_path(index, size, cache_dir)
    if path.is_file():
        try:
            return load_cache(path)
        except DataError as error:
            # Derived data: an entry that cannot be read (cut short, damaged) is made again.
            log.warning("%s; rebuilding it", error)
            path.unlink(missing_ok=True)
    remove_stale_temps(path.parent)  # caches cut short by a kill
    _write_cache(index.samples, size, path, progress)
    return load_cache(path)


def cache_path(root: Path | str, size: int, cache_dir: Path | str | None = None) -> Path:
    """Where the cache of ``root`` at ``size`` lives (its name encodes the dataset's content)."""
    return _cache_path(index_dataset(root), size, cache_dir)


def _cache_path(index: DatasetIndex, size: int, cache_dir: Path | str | None) -> Path:
    if not index.samples:
        raise DataError(f"no image/mask pairs found under {index.root}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"{index.root.resolve().name}-{size}px-{_cache_key(index.samples, size)}.npz"


def _write_cache(samples: Sequence[Sample], size: int, path: Path, progress: bool) -> None:
    encoded: list[bytes] = []
    masks = np.zeros((len(samples), size, size), dtype=bool)
    original_sizes = []
    for i, sample in enumerate(_progress(samples, progress, f"caching {len(samples)} pairs at {size}px")):
        image = read_image(sample.image)
        assert sample.mask is not None
        mask = read_mask(sample.mask)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, image is {image.shape[1]}x{image.shape[0]}"
            )
        original_sizes.append(image.shape[:2])
        buffer = io.BytesIO()
        Image.fromarray(resize_image(image, size)).save(buffer, format="JPEG", quality=95)
        encoded.append(buffer.getvalue())
        masks[i] = resize_mask(mask, size)
    offsets = np.cumsum([0] + [len(b) for b in encoded]).astype(np.int64)
    payload = {
        "format": np.array(CACHE_FORMAT),
        "stems": np.array(json.dumps([s.stem for s in samples])),
        "size": np.array(size),
        "jpeg": np.frombuffer(b"".join(encoded), dtype=np.uint8),
        "offsets": offsets,
        "masks": np.packbits(masks.reshape(len(samples), -1), axis=1),
        "original_sizes": np.array(original_sizes, dtype=np.int64),
    }
    atomic_write(path, lambda tmp: _savez(tmp, payload))


def _savez(tmp: Path, payload: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as handle:
        np.savez(handle, **payload)


def load_cache(path: Path | str) -> CachedData:
    """Decode a cache file written by :func:`build_cache` (no pickle: ``allow_pickle=False``)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data.files or str(data["format"]) != CACHE_FORMAT:
                raise DataError(f"{path} is not a polypseg cache (written by polypseg data cache --out)")
            stems = json.loads(str(data["stems"]))
            size = int(data["size"])
            jpeg = data["jpeg"]
            offsets = data["offsets"]
            masks = np.unpackbits(data["masks"], axis=1, count=size * size).reshape(len(stems), size, size).astype(bool)
            original_sizes = [tuple(int(v) for v in row) for row in data["original_sizes"]]
        images = np.empty((len(stems), size, size, 3), dtype=np.uint8)
        for i in range(len(stems)):
            with Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())) as image:
                images[i] = np.asarray(image.convert("RGB"))
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - object arrays (pickle refused), truncation, bad fields: a bad file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path} is not a usable polypseg cache: {reason}") from None
    return CachedData(stems=stems, images=images, masks=masks, original_sizes=original_sizes, size=size)


def resumed_data(saved: str, given: Path | str | None) -> tuple[str, list[str]]:
    """The data a resumed run reads, and the change to refuse if ``given`` is other data.

    The same folder, or a copy with the same content elsewhere, is accepted (a run moved to another
    machine); so is the bundled sample, which the command line passes when ``--data`` is omitted.
    """
    if given is None:
        return saved, []
    given_path = Path(given).resolve()
    if str(given_path) == saved:
        return saved, []
    from polypseg.data.sample_data import sample_dataset_path

    if given_path == Path(sample_dataset_path()).resolve():
        return saved, []  # the command line's stand-in for an omitted --data
    if not Path(saved).exists():
        return str(given_path), []  # moved: splits.json still checks that the images are the run's
    try:
        if dataset_fingerprint(saved) == dataset_fingerprint(given_path):
            return str(given_path), []
    except DataError:
        pass
    return saved, [f"data: {saved!r} -> {str(given_path)!r}"]
