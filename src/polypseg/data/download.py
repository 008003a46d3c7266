"""Download, verify and unpack public polyp datasets (currently Kvasir-SEG).

The archive is fetched into a temporary folder next to the destination (same filesystem),
unpacked there, checked file by file against the SHA-256 manifest shipped with the package,
and only then renamed into place, so a destination folder either verifies or does not exist.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path, PurePosixPath, PureWindowsPath

from polypseg.errors import PolypsegError

KVASIR_SEG_URL = "https://datasets.simula.no/downloads/kvasir-seg.zip"

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
USER_AGENT = "polypseg-downloader/0.1 (+urllib)"


class DownloadError(PolypsegError):
    """A dataset could not be downloaded, unpacked or verified (one-line message)."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from and how to check it."""

    url: str
    manifest: str  # file name inside polypseg/data/manifests/
    top_folder: str  # folder at the top of the official archive


DATASETS: dict[str, DatasetSpec] = {
    "kvasir-seg": DatasetSpec(
        url=KVASIR_SEG_URL,
        manifest="kvasir-seg.sha256.json",
        top_folder="Kvasir-SEG",
    ),
}


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise DownloadError(f"unknown dataset {name!r} (known: {known})") from None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def load_manifest(name: str) -> dict:
    """Load the shipped manifest ``polypseg/data/manifests/<name>.sha256.json``."""
    spec = _spec(name)
    text = files("polypseg.data.manifests").joinpath(spec.manifest).read_text(encoding="utf-8")
    return json.loads(text)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _unsafe_member(name: str) -> bool:
    """True for archive paths that could land outside the extraction folder."""
    if not name or name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return True
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return ".." in parts


def verify_against_manifest(root: Path, manifest: dict) -> list[str]:
    """Check every manifest file under ``root`` (size, then SHA-256); return problems.

    An empty list means the folder verifies. Files not in the manifest are ignored.
    """
    root = Path(root)
    problems: list[str] = []
    entries = manifest.get("files")
    if not isinstance(entries, dict) or not entries:
        return ["manifest lists no files"]
    for rel, entry in sorted(entries.items()):
        if _unsafe_member(rel):
            problems.append(f"unsafe path in manifest: {rel}")
            continue
        path = root / rel
        if not path.is_file():
            problems.append(f"missing file: {rel}")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"size mismatch: {rel} (expected {entry['size']} bytes, got {size})")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"checksum mismatch: {rel}")
    return problems


def _summarize(problems: list[str]) -> str:
    extra = len(problems) - 1
    return problems[0] + (f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else "")


def _fetch(url: str, out: Path, progress: bool, dest: Path) -> None:
    """Stream ``url`` into ``out``; any failure becomes a DownloadError."""
    hint = (
        f"Download it by hand from a machine with internet and unpack it into {dest} "
        "(or pass a file:// URL of a local copy)"
    )
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.URLError as e:
        reason = e.reason if not isinstance(e, urllib.error.HTTPError) else e
        raise DownloadError(f"cannot reach {url}: {_one_line(reason)}. {hint}") from e
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise DownloadError(f"cannot reach {url}: {_one_line(e) or type(e).__name__}. {hint}") from e

    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        done = 0
        try:
            with open(out, "wb") as f:
                if progress:
                    done = _copy_with_progress(response, f, total, url)
                else:
                    while block := response.read(CHUNK_BYTES):
                        f.write(block)
                        done += len(block)
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(f"download from {url} failed: {_one_line(e) or type(e).__name__}. {hint}") from e
    if total is not None and done != total:
        raise DownloadError(f"download from {url} ended early: got {done} of {total} bytes")


def _copy_with_progress(response, f, total: int | None, url: str) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    done = 0
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(f"download {url.rsplit('/', 1)[-1] or url}", total=total)
        while block := response.read(CHUNK_BYTES):
            f.write(block)
            done += len(block)
            bar.update(task, advance=len(block))
    return done


def _extract(zip_path: Path, out: Path, url: str) -> None:
    """Unpack ``zip_path`` into ``out`` after rejecting unsafe member paths."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                if _unsafe_member(info.filename):
                    raise DownloadError(f"unsafe path in archive from {url}: {info.filename!r} (refusing to extract)")
            zf.extractall(out)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"archive from {url} is not a valid zip: {_one_line(e)}") from e
    except OSError as e:
        raise DownloadError(f"cannot unpack archive from {url}: {_one_line(e)}") from e


def _find_root(folder: Path, top_folder: str) -> Path | None:
    """The shallowest folder holding both images/ and masks/ (the expected top folder first)."""

    def is_root(p: Path) -> bool:
        return (p / "images").is_dir() and (p / "masks").is_dir()

    for candidate in (folder / top_folder, folder):
        if is_root(candidate):
            return candidate
    found = [
        Path(dirpath)
        for dirpath, _, _ in os.walk(folder)
        if "__MACOSX" not in Path(dirpath).parts and is_root(Path(dirpath))
    ]
    return min(found, key=lambda p: (len(p.parts), str(p))) if found else None


def download_dataset(
    name: str,
    to: Path,
    url: str | None = None,
    progress: bool = True,
    manifest: dict | None = None,
) -> Path:
    """Download dataset ``name`` into ``to/<name>``, verify it, and return that folder.

    If ``to/<name>`` already exists and verifies, it is returned without downloading.
    ``url`` overrides the official URL (``file://`` works); ``manifest`` overrides the
    shipped manifest (for tests). Raises DownloadError on any failure.
    """
    spec = _spec(name)
    url = url or spec.url
    manifest = manifest if manifest is not None else load_manifest(name)
    to = Path(to).expanduser()
    dest = to / name

    if dest.exists():
        problems = verify_against_manifest(dest, manifest)
        if not problems:
            return dest
        raise DownloadError(f"{dest} exists but does not verify ({_summarize(problems)}); remove it and rerun")

    try:
        to.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-download-", dir=to))
    except OSError as e:
        raise DownloadError(f"cannot create a working folder in {to}: {_one_line(e)}") from e
    try:
        zip_path = tmp / "archive.zip"
        _fetch(url, zip_path, progress, dest)
        extracted = tmp / "extracted"
        _extract(zip_path, extracted, url)
        zip_path.unlink()
        root = _find_root(extracted, spec.top_folder)
        if root is None:
            raise DownloadError(f"archive from {url} has no folder with images/ and masks/")
        problems = verify_against_manifest(root, manifest)
        if problems:
            raise DownloadError(f"{_summarize(problems)} in archive from {url}")
        try:
            # Same filesystem, so this rename is atomic: dest never exists half-written.
            os.rename(root, dest)
        except OSError as e:
            raise DownloadError(f"cannot move verified dataset into {dest}: {_one_line(e)}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
