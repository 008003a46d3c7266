"""A review folder: a reviewer's verdicts, notes and corrected masks, kept as a training data set.

``ReviewStore(DIR)`` keeps one record per image in ``DIR/review.json`` (verdict ``accept``,
``reject`` or ``needs_correction``, a free-text note, timestamps) and writes each corrected mask
as ``DIR/masks/<stem>.png`` (single channel, 0/255) beside the original image bytes in
``DIR/images/<stem>.<ext>``, so DIR is a data set that ``polypseg data check`` accepts and
``polypseg train --data DIR`` trains on.

Every file is written atomically (a temporary file renamed onto the target), under a lock that
also holds across processes, so a crash, a reload or two writers at once never leave a torn file.
A corrected mask and its image are written under hidden temporary names first and moved into place
only once ``review.json`` holds their record, so a failed save (full disk, read-only folder) leaves
the folder exactly as it was: no new file without a record, no earlier mask or image replaced.
Names come from clients: :func:`check_name` refuses any name that could choose a path outside DIR.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import re
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from polypseg.core.io_utils import atomic_write_json, default_file_mode, json_text, read_json
from polypseg.data.pairing import IMAGE_EXTENSIONS
from polypseg.errors import PolypsegError

try:  # POSIX: the lock also holds between processes serving the same folder
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process at a time, threads still locked
    fcntl = None  # type: ignore[assignment]

REVIEW_FORMAT = "polypseg-review-v1"
REVIEW_FILE = "review.json"
LOCK_FILE = ".review.lock"
STATUSES = ("accept", "reject", "needs_correction")
KEEP = "keep"  # set_verdict(status=KEEP): the stored verdict stays (a note saved alone)
MAX_NOTE_CHARS = 4000
MAX_NAME_CHARS = 200
# Names Windows reserves in every folder (with any extension): refused so a review folder copies anywhere.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The extension a saved image gets, from the format its bytes really are (not the client's name).
FORMAT_EXTENSIONS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "TIFF": (".tif", ".tiff"), "BMP": (".bmp",)}
FORMAT_EXTENSIONS["WEBP"] = (".webp",)
CSV_COLUMNS = (
    "file",
    "status",
    "note",
    "corrected",
    "dice_vs_model",
    "threshold",
    "mask_area_pixels",
    "model_area_pixels",
    "created",
    "updated",
    "mask_saved",
)


class ReviewError(PolypsegError):
    """A review request that cannot be honoured; ``kind`` says why (the web app maps it to a status)."""

    kind = "invalid"


class BadName(ReviewError):
    kind = "bad_name"


class NotReviewed(ReviewError):
    kind = "not_found"


class NameConflict(ReviewError):
    kind = "conflict"


class ImageConflict(ReviewError):
    """A mask sent with an image other than the one already saved under that name."""

    kind = "image_conflict"


class BadMask(ReviewError):
    kind = "bad_mask"


class ReviewUnreadable(ReviewError):
    """``review.json`` cannot be read or is not a review file: a problem of the server's folder, not
    of the request. The message names the file as ``review.json`` only, never the server's path."""

    kind = "unreadable"


class StorageError(ReviewError):
    """The folder cannot be written (full disk, read-only, permissions); nothing saved before is lost."""

    kind = "storage"

    def __init__(self, message: str, reason: str = "unwritable") -> None:
        super().__init__(message)
        self.reason = reason  # "disk_full" or "read_only"


@dataclass
class ReviewRecord:
    """One image's review: the verdict, a note and, once saved, the corrected mask's figures."""

    file: str
    status: str | None = None
    note: str = ""
    created: str = ""
    updated: str = ""
    corrected: bool = False
    mask_saved: str | None = None
    dice_vs_model: float | None = None  # Dice of the reviewer's mask against the model's mask
    threshold: float | None = None  # the threshold of that model mask
    mask_area_pixels: int | None = None
    model_area_pixels: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReviewRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ReviewSummary:
    """Counts over the records: per verdict, corrected masks, and records without a verdict yet."""

    records: int
    accept: int
    reject: int
    needs_correction: int
    corrected: int
    no_verdict: int


def now_utc() -> str:
    """The current time as ISO 8601 UTC with seconds (``2026-01-31T12:00:00Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(name: str) -> str:
    """``name`` if it is a plain image file name that can only live inside the review folder, else
    :class:`BadName`: no folders, ``..``, absolute paths, control characters, hidden or Windows
    reserved names, and an image extension."""
    shown = repr(name[:60])
    if not name or len(name) > MAX_NAME_CHARS:
        raise BadName(f"invalid image name {shown}: 1 to {MAX_NAME_CHARS} characters")
    if "/" in name or "\\" in name or _CONTROL.search(name) or ":" in name:
        raise BadName(f"invalid image name {shown}: a plain file name, without folders, ':' or control characters")
    if name.startswith(".") or name != name.strip() or name.endswith("."):
        raise BadName(f"invalid image name {shown}: no leading dot and no leading or trailing space or dot")
    stem, suffix = os.path.splitext(name)
    if suffix.lower() not in IMAGE_EXTENSIONS or not stem:
        raise BadName(f"invalid image name {shown}: the name needs an image extension ({', '.join(IMAGE_EXTENSIONS)})")
    if stem.split(".")[0].lower() in _RESERVED:
        raise BadName(f"invalid image name {shown}: a reserved device name")
    return name


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def mask_png(mask: np.ndarray) -> bytes:
    """A boolean mask as a single-channel 8-bit PNG of 0 and 255."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


class ReviewStore:
    """The review folder ``root``: records in ``review.json``, the data set in ``images/`` + ``masks/``.

    >>> store = ReviewStore("review")
    >>> store.set_verdict("case1.jpg", status="needs_correction", note="misses the flat part")
    >>> store.save_correction("case1.jpg", image=jpeg_bytes, image_format="JPEG", mask=mask)
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._thread_lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of review.json when last read
        if self.root.exists() and not self.root.is_dir():
            raise ReviewError(f"review folder {self.root} is a file, not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ReviewError(f"cannot create the review folder {self.root}: {error.strerror or error}") from None
        self._records = self._read_records()

    # ------------------------------------------------------------------ reading

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def masks_dir(self) -> Path:
        return self.root / "masks"

    def records(self) -> list[ReviewRecord]:
        """Every record, sorted by file name."""
        with self._thread_lock:
            self._refresh()
            return [ReviewRecord.from_dict(asdict(r)) for _, r in sorted(self._records.items())]

    def get(self, name: str) -> ReviewRecord:
        """The record of ``name``, or :class:`NotReviewed`."""
        check_name(name)
        with self._thread_lock:
            self._refresh()
            record = self._records.get(name)
            if record is None:
                raise NotReviewed(f"'{name}' has no review record")
            return ReviewRecord.from_dict(asdict(record))

    def summary(self) -> ReviewSummary:
        records = self.records()
        by_status = {status: sum(r.status == status for r in records) for status in STATUSES}
        return ReviewSummary(
            records=len(records),
            corrected=sum(r.corrected for r in records),
            no_verdict=sum(r.status is None for r in records),
            **by_status,
        )

    def mask_path(self, name: str) -> Path:
        """The saved corrected mask of ``name`` (``masks/<stem>.png``), or :class:`NotReviewed`."""
        record = self.get(name)
        path = self.masks_dir / f"{Path(name).stem}.png"
        if not record.corrected or not path.is_file():
            raise NotReviewed(f"'{name}' has no corrected mask")
        return path

    def image_path(self, name: str) -> Path | None:
        """The saved original image of ``name`` in ``images/``, if one was saved."""
        record = self.get(name)
        stem = Path(name).stem
        if not record.corrected:
            return None
        return next((p for p in self._same_stem(stem) if p.is_file() and not p.is_symlink()), None)

    # ------------------------------------------------------------------ writing

    def set_verdict(self, name: str, *, status: str | None, note: str | None = None) -> ReviewRecord:
        """Record ``status`` (one of :data:`STATUSES`, ``None`` to clear it, or :data:`KEEP` to leave
        the stored one, as a note saved on its own does) and, when given, the note."""
        check_name(name)
        if status is not None and status not in (*STATUSES, KEEP):
            raise ReviewError(f"invalid status '{status}': choose {', '.join(STATUSES)}")
        if note is not None and len(note) > MAX_NOTE_CHARS:
            raise ReviewError(f"the note has {len(note)} characters, over the limit of {MAX_NOTE_CHARS}")
        with self._locked():
            record = self._records.get(name) or ReviewRecord(file=name, created=now_utc())
            kept = record.status if status == KEEP else status  # under the lock: another tab's verdict stays
            updated = ReviewRecord.from_dict({**asdict(record), "status": kept, "updated": now_utc()})
            if note is not None:
                updated.note = note
            self._commit(name, updated)
            return updated

    def save_correction(
        self,
        name: str,
        *,
        image: bytes | None,
        image_format: str | None,
        image_size: tuple[int, int],
        mask: np.ndarray,
        model_mask: np.ndarray | None = None,
        threshold: float | None = None,
    ) -> ReviewRecord:
        """Save the reviewer's ``mask`` of image ``name`` (``image_size`` = (height, width)).

        ``image`` (the original bytes, in ``image_format``) is written to ``images/`` the first
        time; later saves may omit it, and one with other bytes than the saved image is refused
        (:class:`ImageConflict`: two images with one file name must not share a record). With
        ``model_mask`` (the model's mask at ``threshold``) the record gets the Dice of the
        reviewer's mask against it.
        """
        check_name(name)
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.ndim != 2:
            raise BadMask(f"{name}: the mask must be a 2-D boolean array")
        if mask.shape != tuple(image_size):
            raise BadMask(
                f"{name}: the mask is {mask.shape[1]}x{mask.shape[0]}, the image {image_size[1]}x{image_size[0]}"
            )
        if model_mask is not None and np.shape(model_mask) != mask.shape:
            raise BadMask(f"{name}: the model's mask is not the image's size")
        stem = Path(name).stem
        with self._locked():
            self._check_inside()
            other = next((p for p in self._records if p != name and Path(p).stem == stem), None)
            if other is not None:
                raise NameConflict(f"'{name}' and the reviewed '{other}' share the file stem '{stem}'")
            files = {self.masks_dir / f"{stem}.png": mask_png(mask)}
            stale: list[Path] = []
            stored = self._stored_image(name, stem)
            if image is not None and stored is None:
                image_target = self._image_target(name, stem, image_format)
                files[image_target] = image
                # files of this stem without a corrected record (an interrupted older save): replaced
                stale = [p for p in self._same_stem(stem) if p != image_target and p.is_file() and not p.is_symlink()]
            elif image is not None and stored is not None and stored.read_bytes() != image:
                raise ImageConflict(
                    f"'{name}' already has a different image saved (images/{stored.name}): two images with one file "
                    f"name? Rename one; to replace the saved image, remove images/{stored.name} from the review folder"
                )
            elif image is None and self.image_path_unlocked(stem) is None:
                raise BadMask(f"{name}: send the image with its first corrected mask")
            for target in files:  # checked before anything is written, so a refusal writes nothing
                self._refuse_link(target)
            record = self._records.get(name) or ReviewRecord(file=name, created=now_utc())
            saved = now_utc()
            updated = ReviewRecord.from_dict(
                {
                    **asdict(record),
                    "corrected": True,
                    "mask_saved": saved,
                    "updated": saved,
                    "mask_area_pixels": int(np.count_nonzero(mask)),
                    "threshold": None if threshold is None else float(threshold),
                    "model_area_pixels": None if model_mask is None else int(np.count_nonzero(model_mask)),
                    "dice_vs_model": None if model_mask is None else round(dice(mask, np.asarray(model_mask)), 6),
                }
            )
            self._commit_with_files(name, updated, files)
            for old in stale:  # removed only once the new image is in place and recorded
                with contextlib.suppress(OSError):
                    old.unlink()
            return updated

    # ------------------------------------------------------------------ export

    def export_json(self) -> str:
        """The records and the summary as JSON text."""
        return json_text(
            {
                "format": REVIEW_FORMAT,
                "summary": asdict(self.summary()),
                "records": [asdict(r) for r in self.records()],
            }
        )

    def export_csv(self) -> str:
        """One row per record (:data:`CSV_COLUMNS`)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for record in self.records():
            row = asdict(record)
            row["note"] = _csv_safe(row["note"])
            row["file"] = _csv_safe(row["file"])
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return buffer.getvalue()

    def export_zip(self) -> bytes:
        """A zip of the corrected data set: ``images/`` and ``masks/`` of every corrected image, and
        the review as ``review.csv`` and ``review.json``. Unpacked, it passes ``polypseg data check``."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for record in self.records():
                if not record.corrected:
                    continue
                stem = Path(record.file).stem
                with self._thread_lock:
                    image = self.image_path_unlocked(stem)
                mask = self.masks_dir / f"{stem}.png"
                if image is None or not mask.is_file() or mask.is_symlink():
                    continue
                archive.writestr(f"images/{image.name}", image.read_bytes())
                archive.writestr(f"masks/{mask.name}", mask.read_bytes())
            archive.writestr("review.csv", self.export_csv())
            archive.writestr("review.json", self.export_json())
        return buffer.getvalue()

    # ------------------------------------------------------------------ internals

    def _stored_image(self, name: str, stem: str) -> Path | None:
        """The image saved with ``name``'s corrected mask, if its record has one (called under the lock)."""
        record = self._records.get(name)
        return self.image_path_unlocked(stem) if record is not None and record.corrected else None

    def image_path_unlocked(self, stem: str) -> Path | None:
        return next((p for p in self._same_stem(stem) if p.is_file() and not p.is_symlink()), None)

    def _same_stem(self, stem: str) -> list[Path]:
        if not self.images_dir.is_dir():
            return []
        return sorted(p for p in self.images_dir.iterdir() if p.stem == stem and p.suffix.lower() in IMAGE_EXTENSIONS)

    def _image_target(self, name: str, stem: str, image_format: str | None) -> Path:
        """``images/<stem>.<ext>``, the extension following the format the bytes really are."""
        extensions = FORMAT_EXTENSIONS.get(image_format or "")
        if extensions is None:
            raise BadMask(f"{name}: unsupported image format {image_format}")
        suffix = Path(name).suffix.lower()
        return self.images_dir / f"{stem}{suffix if suffix in extensions else extensions[0]}"

    def _check_inside(self) -> None:
        """Refuse to write when ``images/`` or ``masks/`` leads out of the folder (a symlink)."""
        root = self.root.resolve()
        for folder in (self.images_dir, self.masks_dir):
            if folder.is_symlink() or (folder.exists() and not folder.resolve().is_relative_to(root)):
                raise ReviewError(f"{folder.name}/ in the review folder is a link; refusing to write through it")
            if folder.exists() and not folder.is_dir():
                raise ReviewError(f"{folder.name} in the review folder is not a folder")

    @staticmethod
    def _refuse_link(path: Path) -> None:
        if path.is_symlink():
            raise ReviewError(f"{path.parent.name}/{path.name} in the review folder is a link; refusing to replace it")

    def _commit(self, name: str, record: ReviewRecord) -> None:
        """Write the records with ``record`` in place; memory changes only once the file is written."""
        records = {**self._records, name: record}
        payload = {"format": REVIEW_FORMAT, "records": {k: asdict(v) for k, v in sorted(records.items())}}
        with _storage_errors(self.root):
            atomic_write_json(self.root / REVIEW_FILE, payload)
        self._records = records
        self._seen = self._stamp()

    def _commit_with_files(self, name: str, record: ReviewRecord, files: dict[Path, bytes]) -> None:
        """Write ``files`` (target -> bytes) under hidden temporary names, commit ``record``, then
        rename each onto its target. Any failure before the rename removes the temporaries, so a
        failed save leaves no new file behind and replaces no earlier one."""
        staged: dict[Path, Path] = {}
        try:
            with _storage_errors(self.root):
                for target, data in files.items():
                    staged[target] = _write_hidden(target, data)
            self._commit(name, record)
            try:
                for target, temporary in staged.items():
                    os.replace(temporary, target)
            except OSError as error:
                # Renames within one folder fail only on I/O errors, after review.json already holds the record.
                raise StorageError(
                    f"the record was saved but its files could not be put in place ({error.strerror or error}); "
                    "save the mask again"
                ) from None
        finally:
            for temporary in staged.values():
                with contextlib.suppress(OSError):
                    temporary.unlink(missing_ok=True)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = (self.root / REVIEW_FILE).stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _refresh(self) -> None:
        """Re-read ``review.json`` when another process has replaced it since this store last read it;
        :class:`ReviewUnreadable` when it can no longer be read (never stale records in silence)."""
        if self._stamp() != self._seen:
            self._records = self._read_records()

    def _read_records(self) -> dict[str, ReviewRecord]:
        """The records of ``review.json`` (none when it does not exist yet), or :class:`ReviewUnreadable`.
        ``_seen`` is set only after a good read, so a broken file is reported again on the next call."""
        path = self.root / REVIEW_FILE
        stamp = self._stamp()
        if not path.is_file():
            if path.exists() or path.is_symlink():
                raise ReviewUnreadable(f"{REVIEW_FILE} in the review folder is not a readable file")
            self._seen = stamp
            return {}
        try:
            data = read_json(path)
        except OSError as error:
            raise ReviewUnreadable(
                f"cannot read {REVIEW_FILE} in the review folder ({error.strerror or error})"
            ) from None
        except ValueError as error:
            raise ReviewUnreadable(
                f"{REVIEW_FILE} in the review folder is damaged ({error}); restore it from a backup or move it away"
            ) from None
        if not isinstance(data, dict) or data.get("format") != REVIEW_FORMAT:
            raise ReviewUnreadable(
                f"{REVIEW_FILE} in the review folder is not a polypseg review file (format {REVIEW_FORMAT})"
            )
        try:
            records = {name: ReviewRecord.from_dict(item) for name, item in dict(data.get("records") or {}).items()}
        except (AttributeError, TypeError, ValueError):  # records that are not a mapping of name -> record fields
            raise ReviewUnreadable(
                f"{REVIEW_FILE} in the review folder is damaged (its records are malformed)"
            ) from None
        self._seen = stamp
        return records

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This store's thread lock and, on POSIX, an exclusive lock on ``.review.lock`` that other
        processes serving the folder share; the records are re-read once both are held."""
        with self._thread_lock:
            handle = None
            if fcntl is not None:
                try:
                    handle = open(self.root / LOCK_FILE, "a+b")
                except OSError:
                    handle = None  # a read-only folder: the write below reports it
            try:
                if handle is not None:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    self._records = self._read_records()
                yield
            finally:
                if handle is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    handle.close()


@contextlib.contextmanager
def _storage_errors(root: Path) -> Iterator[None]:
    """Turn a failed write into :class:`StorageError` naming the cause, without server paths."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(
                "the review folder's disk is full: nothing new was saved, earlier saves are intact", "disk_full"
            ) from None
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise StorageError(
                "the review folder is read-only: nothing new was saved, earlier saves are intact", "read_only"
            ) from None
        raise StorageError(f"cannot write to the review folder ({error.strerror or type(error).__name__})") from None


def _write_hidden(target: Path, data: bytes) -> Path:
    """``data`` in a new hidden file beside ``target`` (``.<name>.<random>.tmp``: data checks and
    training skip hidden files), with the mode a new file gets, ready to be renamed onto ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, default_file_mode())  # mkstemp's 0600 would make the data set unreadable to others
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _csv_safe(text: str) -> str:
    """Cells that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``) get a leading quote."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
