"""Finding a dataset's image and mask folders and pairing their files by stem.

Layouts understood (pairs are always matched by file stem, never by sorted order):

* Kvasir-SEG and any generic folder: ``images/`` + ``masks/`` (jpg, png, bmp, tif...).
* CVC-ClinicDB: ``Original/`` + ``Ground Truth/`` (TIFF; Pillow cannot open these, tifffile can).

Nothing here decodes pixels: an entry that cannot be used (an unsupported format, a broken
symlink, a folder named like an image) is recorded with its cause, for :mod:`polypseg.data.check`.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from polypseg.core.io_utils import display_name
from polypseg.data.images import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
LAYOUTS = (("images", "masks"), ("Original", "Ground Truth"))


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
    if stat.S_ISDIR(info.st_mode):
        return "a folder, not an image file" if suffix in IMAGE_EXTENSIONS else None
    if not stat.S_ISREG(info.st_mode):
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
