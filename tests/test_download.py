"""Tests for polypseg.data.download and the bundled sample (CPU, no internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polypseg.data.download import (
    DATASETS,
    KVASIR_SEG_URL,
    DownloadError,
    download_dataset,
    load_manifest,
    verify_against_manifest,
)
from polypseg.data.sample_data import sample_dataset_path

NAME = "kvasir-seg"


def _jpeg(seed: int, mask: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if mask:
        arr = np.zeros((24, 32, 3), np.uint8)
        arr[6:18, 8 + seed : 20 + seed] = 255
    else:
        arr = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fake_files() -> dict[str, bytes]:
    """Relative path -> content of a tiny Kvasir-SEG-like dataset."""
    content: dict[str, bytes] = {}
    for i in range(3):
        content[f"images/img{i}.jpg"] = _jpeg(i)
        content[f"masks/img{i}.jpg"] = _jpeg(i, mask=True)
    content["kavsir_bboxes.json"] = b'{"img0": {"height": 24, "width": 32, "bbox": []}}'
    return content


@pytest.fixture(scope="module")
def fake_manifest(fake_files: dict[str, bytes]) -> dict:
    return {
        "dataset": NAME,
        "files": {
            rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for rel, data in sorted(fake_files.items())
        },
    }


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


class _Server:
    """Static file server on 127.0.0.1 counting GET requests."""

    def __init__(self, directory: Path) -> None:
        self.hits = 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        handler = functools.partial(Handler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path: Path, fake_files: dict[str, bytes]):
    """Serves good.zip, corrupt.zip and slip.zip from a temporary folder."""
    site = tmp_path / "site"
    site.mkdir()
    _write_zip(site / "good.zip", {f"Kvasir-SEG/{k}": v for k, v in fake_files.items()})
    corrupt = {f"Kvasir-SEG/{k}": v for k, v in fake_files.items()}
    damaged = bytearray(fake_files["masks/img1.jpg"])
    damaged[len(damaged) // 2] ^= 0xFF  # same size, different content
    corrupt["Kvasir-SEG/masks/img1.jpg"] = bytes(damaged)
    _write_zip(site / "corrupt.zip", corrupt)
    slip = {f"Kvasir-SEG/{k}": v for k, v in fake_files.items()}
    slip["Kvasir-SEG/../../evil.txt"] = b"pwned"
    _write_zip(site / "slip.zip", slip)
    srv = _Server(site)
    yield srv
    srv.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_layout(dest: Path, fake_files: dict[str, bytes]) -> None:
    for rel, data in fake_files.items():
        assert (dest / rel).read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == ["images", "kavsir_bboxes.json", "masks"]


def test_registry() -> None:
    assert DATASETS[NAME].url == KVASIR_SEG_URL
    assert DATASETS[NAME].top_folder == "Kvasir-SEG"


def test_http_download_and_rerun(tmp_path, server, fake_files, fake_manifest) -> None:
    to = tmp_path / "data"
    dest = download_dataset(NAME, to, url=server.url("good.zip"), progress=True, manifest=fake_manifest)
    assert dest == to / NAME
    _check_layout(dest, fake_files)
    assert [p.name for p in to.iterdir()] == [NAME]  # temp folder cleaned up
    assert server.hits == 1

    again = download_dataset(NAME, to, url=server.url("good.zip"), progress=False, manifest=fake_manifest)
    assert again == dest
    assert server.hits == 1


def test_existing_bad_destination(tmp_path, server, fake_manifest) -> None:
    dest = tmp_path / NAME
    (dest / "images").mkdir(parents=True)
    with pytest.raises(DownloadError, match="remove it") as exc:
        download_dataset(NAME, tmp_path, url=server.url("good.zip"), manifest=fake_manifest)
    assert str(dest) in str(exc.value)
    assert server.hits == 0


def test_corrupt_file(tmp_path, server, fake_manifest) -> None:
    to = tmp_path / "data"
    url = server.url("corrupt.zip")
    with pytest.raises(DownloadError) as exc:
        download_dataset(NAME, to, url=url, progress=False, manifest=fake_manifest)
    msg = str(exc.value)
    assert "checksum mismatch: masks/img1.jpg" in msg
    assert "\n" not in msg
    assert not (to / NAME).exists()
    assert list(to.iterdir()) == []


def test_unreachable(tmp_path, fake_manifest) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/kvasir-seg.zip"
    to = tmp_path / "data"
    with pytest.raises(DownloadError) as exc:
        download_dataset(NAME, to, url=url, progress=False, manifest=fake_manifest)
    msg = str(exc.value)
    assert msg.startswith(f"cannot reach {url}: ")
    assert "by hand" in msg and str(to / NAME) in msg
    assert "\n" not in msg
    assert not (to / NAME).exists()
    assert list(to.iterdir()) == []


def test_http_404(tmp_path, server, fake_manifest) -> None:
    url = server.url("missing.zip")
    to = tmp_path / "data"
    with pytest.raises(DownloadError, match="404") as exc:
        download_dataset(NAME, to, url=url, progress=False, manifest=fake_manifest)
    assert url in str(exc.value)
    assert list(to.iterdir()) == []


def test_zip_slip_rejected(tmp_path, server, fake_manifest) -> None:
    to = tmp_path / "a" / "b" / "data"
    with pytest.raises(DownloadError, match="unsafe path") as exc:
        download_dataset(NAME, to, url=server.url("slip.zip"), progress=False, manifest=fake_manifest)
    assert "evil.txt" in str(exc.value)
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))
    assert list(to.iterdir()) == []


def test_file_url(tmp_path, fake_files, fake_manifest) -> None:
    # A mirror zip without the top folder: the root is found wherever images/ and masks/ are.
    zip_path = _write_zip(tmp_path / "mirror.zip", dict(fake_files) | {"extra/readme.txt": b"x"})
    dest = download_dataset(NAME, tmp_path / "data", url=zip_path.as_uri(), progress=False, manifest=fake_manifest)
    for rel, data in fake_files.items():
        assert (dest / rel).read_bytes() == data


def test_not_a_zip(tmp_path, fake_manifest) -> None:
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(b"<html>not a zip</html>")
    with pytest.raises(DownloadError, match="not a valid zip"):
        download_dataset(NAME, tmp_path / "data", url=bogus.as_uri(), progress=False, manifest=fake_manifest)
    assert list((tmp_path / "data").iterdir()) == []


def test_verify_reports_problems(tmp_path, fake_files, fake_manifest) -> None:
    for rel, data in fake_files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    assert verify_against_manifest(tmp_path, fake_manifest) == []
    (tmp_path / "images/img0.jpg").unlink()
    (tmp_path / "masks/img2.jpg").write_bytes(b"short")
    problems = verify_against_manifest(tmp_path, fake_manifest)
    assert problems == [
        "missing file: images/img0.jpg",
        f"size mismatch: masks/img2.jpg (expected {len(fake_files['masks/img2.jpg'])} bytes, got 5)",
    ]


def test_shipped_manifest() -> None:
    manifest = load_manifest(NAME)
    assert manifest["dataset"] == NAME
    entries = manifest["files"]
    assert len(entries) == 2001
    assert sum(k.startswith("images/") for k in entries) == 1000
    assert sum(k.startswith("masks/") for k in entries) == 1000
    assert "kavsir_bboxes.json" in entries
    assert all(len(v["sha256"]) == 64 and v["size"] > 0 for v in entries.values())


def test_shipped_manifest_matches_shared_copy(shared_dataset) -> None:
    assert verify_against_manifest(shared_dataset(NAME), load_manifest(NAME)) == []


def test_bundled_sample() -> None:
    root = sample_dataset_path()
    assert (root / "NOTICE.md").is_file()
    notice = (root / "NOTICE.md").read_text(encoding="utf-8")
    assert "Jha" in notice and "research and education" in notice
    images = sorted(p.stem for p in (root / "images").glob("*.jpg"))
    masks = sorted(p.stem for p in (root / "masks").glob("*.png"))
    assert len(images) == 40
    assert images == masks
    for stem in images:
        with Image.open(root / "images" / f"{stem}.jpg") as im:
            size = im.size
            assert im.mode == "RGB"
        with Image.open(root / "masks" / f"{stem}.png") as m:
            assert m.size == size
            values = set(np.unique(np.asarray(m)).tolist())
        assert max(size) <= 256
        assert values <= {0, 255}
