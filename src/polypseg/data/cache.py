"""The preprocessed cache: a dataset resized once and stored compactly, keyed by its content.

Also the content fingerprint of a dataset, which a resumed run uses to accept the same data moved
elsewhere (:func:`resumed_data`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from polypseg.core.io_utils import atomic_write, display_name, remove_stale_temps
from polypseg.data.check import usable_index, with_progress
from polypseg.data.images import DataError, read_image, read_mask, resize_image, resize_mask
from polypseg.data.pairing import DatasetIndex, Sample, index_dataset

CACHE_FORMAT = "polypseg-cache-v1"
log = logging.getLogger(__name__)


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

    def concat(self, other: CachedData) -> CachedData:
        """These pairs followed by ``other``'s; both at the same size and with no stem in common."""
        if other.size != self.size:
            raise DataError(f"cannot join {other.size}px pairs to {self.size}px pairs: rebuild both at one size")
        shared = sorted(set(self.stems) & set(other.stems))
        if shared:
            raise DataError(f"{len(shared)} stem(s) in both sets of pairs, e.g. '{shared[0]}'")
        return CachedData(
            stems=self.stems + other.stems,
            images=np.concatenate([self.images, other.images]),
            masks=np.concatenate([self.masks, other.masks]),
            original_sizes=self.original_sizes + other.original_sizes,
            size=self.size,
        )

    def renamed(self, prefix: str) -> CachedData:
        """The same pairs with ``prefix`` before every stem (e.g. to keep two datasets' stems apart)."""
        return replace(self, stems=[f"{prefix}{stem}" for stem in self.stems])


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
    for i, sample in enumerate(with_progress(samples, progress, f"caching {len(samples)} pairs at {size}px")):
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
