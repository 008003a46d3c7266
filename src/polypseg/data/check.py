"""Checking a dataset before it is used: the one rule for a dataset folder.

``polypseg data check`` reports every problem (:func:`check_dataset`), and every command that trains or
evaluates on a folder refuses one with errors (:func:`usable_index`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polypseg.core.io_utils import display_name
from polypseg.data.images import DataError, ImageReadError, read_image, read_mask_uint8
from polypseg.data.pairing import DatasetIndex, find_layout, index_dataset

MIN_CHECK_SIDE = 32  # `data check` warns about images smaller than this on a side


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
    for sample in with_progress(index.samples, progress, "checking"):
        try:
            image = read_image(sample.image)
        except ImageReadError as error:
            report.problems.append(Problem("error", "undecodable", sample.image, str(error)))
            continue
        assert sample.mask is not None
        try:
            raw = read_mask_uint8(sample.mask)
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


def with_progress(items: Sequence, enabled: bool, description: str) -> Iterable:
    """``items``, behind a transient progress bar when ``enabled``."""
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)
