"""``/v1/reviews``: verdicts, corrected masks and exports over HTTP, good and bad input."""

from __future__ import annotations

import csv
import errno
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from polypseg.core import io_utils
from polypseg.data import review
from polypseg.data.check import check_dataset
from polypseg.data.images import read_mask
from polypseg.web.app import WebSettings, create_app
from polypseg.web.service import InferenceService

from helpers import save_tiny_checkpoint

SIZE = (40, 52)  # height, width


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> InferenceService:
    weights = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return InferenceService.from_checkpoint(weights.with_suffix(""), device="cpu", max_batch=2)


@pytest.fixture()
def review_dir(tmp_path: Path) -> Path:
    return tmp_path / "review"


@pytest.fixture()
def client(service: InferenceService, review_dir: Path):
    with TestClient(create_app(service, WebSettings(review_dir=review_dir, max_upload_bytes=200_000))) as test_client:
        yield test_client


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def image_bytes(seed: int = 0, size: tuple[int, int] = SIZE) -> bytes:
    rng = np.random.default_rng(seed)
    return png(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8))


def disc(r: int = 8, size: tuple[int, int] = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (yy - size[0] // 2) ** 2 + (xx - size[1] // 2) ** 2 <= r**2


def mask_png(mask: np.ndarray) -> bytes:
    return png(mask.astype(np.uint8) * 255)


def put_mask(client: TestClient, name: str, mask: bytes, image: bytes | None = None, **params):
    files = {"mask": ("mask.png", mask, "image/png")}
    if image is not None:
        files["file"] = (name, image, "image/png")
    return client.put(f"/v1/reviews/{name}/mask", files=files, params=params)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code"} and body["code"] == code, body
    return body


def test_verdicts_round_trip_and_survive_a_restart(client: TestClient, service: InferenceService, review_dir: Path):
    assert client.get("/v1/health").json()["review"] is True
    answer = client.put("/v1/reviews/case1.png", json={"status": "needs_correction", "note": "flat part missed"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "needs_correction" and answer.json()["created"].endswith("Z")
    client.put("/v1/reviews/case2.png", json={"status": "accept"})
    listing = client.get("/v1/reviews").json()
    assert listing["summary"] == {
        "records": 2, "accept": 1, "reject": 0, "needs_correction": 1, "corrected": 0, "no_verdict": 0
    }  # fmt: skip
    # a new app on the same folder (a server restart) has the same records
    with TestClient(create_app(service, WebSettings(review_dir=review_dir))) as restarted:
        record = restarted.get("/v1/reviews/case1.png").json()
    assert (record["status"], record["note"]) == ("needs_correction", "flat part missed")


def test_a_note_sent_alone_keeps_the_verdict_and_null_clears_it(client: TestClient):
    client.put("/v1/reviews/case3.png", json={"status": "reject"})
    answer = client.put("/v1/reviews/case3.png", json={"note": "a second look"})
    assert answer.status_code == 200 and (answer.json()["status"], answer.json()["note"]) == ("reject", "a second look")
    cleared = client.put("/v1/reviews/case3.png", json={"status": None}).json()
    assert (cleared["status"], cleared["note"]) == (None, "a second look")
    assert_error(client.put("/v1/reviews/case3.png", json={}), 422, "invalid_parameter")


def test_bad_verdicts_and_names(client: TestClient):
    assert_error(client.put("/v1/reviews/a.png", json={"status": "maybe"}), 422, "invalid_parameter")
    assert_error(
        client.put("/v1/reviews/a.png", json={"status": "accept", "note": "x" * 5000}), 422, "invalid_parameter"
    )
    assert_error(client.put("/v1/reviews/a.png", content=b"not json"), 422, "invalid_parameter")
    # ".." itself is resolved by the URL layer (404) before any route sees it
    assert client.put("/v1/reviews/..", json={"status": "accept"}).status_code == 404
    for name in ("%2e%2e", "notes.txt", "con.png", ".hidden.png", "a%5Cb.png", "a%00.png"):
        assert_error(client.put(f"/v1/reviews/{name}", json={"status": "accept"}), 400, "invalid_name")
        assert_error(client.get(f"/v1/reviews/{name}"), 400, "invalid_name")
    assert client.put("/v1/reviews/..%2F..%2Fetc.png", json={"status": "accept"}).status_code in (400, 404)
    assert_error(client.get("/v1/reviews/unseen.png"), 404, "not_found")
    assert_error(client.get("/v1/reviews/unseen.png/mask"), 404, "not_found")


def test_corrected_mask_is_saved_as_a_dataset_with_dice_against_the_model(
    client: TestClient, service: InferenceService, review_dir: Path, tmp_path: Path
):
    image = image_bytes()
    # the first mask needs its image
    assert_error(put_mask(client, "case.png", mask_png(disc())), 400, "no_file")
    answer = put_mask(client, "case.png", mask_png(disc()), image, threshold=0.5)
    assert answer.status_code == 200, answer.text
    record = answer.json()
    assert (review_dir / "images/case.png").read_bytes() == image
    np.testing.assert_array_equal(read_mask(review_dir / "masks/case.png"), disc())
    decoded = np.asarray(Image.open(io.BytesIO(image)))
    model = service.predictor.predict([decoded])[0].with_threshold(0.5).mask
    inter = int((model & disc()).sum())
    expected = 2 * inter / (model.sum() + disc().sum()) if model.sum() + disc().sum() else 1.0
    assert record["dice_vs_model"] == pytest.approx(expected, abs=1e-6)
    assert record["threshold"] == 0.5 and record["model_area_pixels"] == int(model.sum()) and record["corrected"]

    # later saves may leave the image out; the served mask is the saved one
    assert put_mask(client, "case.png", mask_png(disc(r=5))).status_code == 200
    served = client.get("/v1/reviews/case.png/mask")
    assert served.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(served.content))) > 0, disc(r=5))
    assert check_dataset(review_dir).ok


def test_bad_masks_are_refused_and_nothing_is_written(client: TestClient, review_dir: Path):
    image = image_bytes()
    assert_error(put_mask(client, "a.png", mask_png(disc(size=(20, 20))), image), 400, "mask_mismatch")
    gray = disc().astype(np.uint8) * 200
    assert_error(put_mask(client, "a.png", png(gray), image), 400, "mask_not_binary")
    colour = np.zeros((*SIZE, 3), np.uint8)
    colour[disc()] = [255, 0, 0]
    assert_error(put_mask(client, "a.png", png(colour), image), 400, "mask_not_binary")
    assert_error(put_mask(client, "a.png", b"garbage bytes", image), 415, "not_an_image")
    assert_error(put_mask(client, "a.png", mask_png(disc()), b"\x89PNG\r\n\x1a\ntruncated"), 400, "corrupt_image")
    assert_error(put_mask(client, "a.png", b"x" * 300_000, image), 413, "upload_too_large")
    assert_error(put_mask(client, "a.png", b"", image), 400, "empty_upload")
    assert_error(client.put("/v1/reviews/a.png/mask", files={"file": ("a.png", image)}), 400, "no_file")
    assert_error(client.put("/v1/reviews/a.png/mask", content=b"text", headers={"content-type": "text/plain"}), 415,
                 "not_an_image")  # fmt: skip
    assert_error(put_mask(client, "%2e%2e", mask_png(disc()), image), 400, "invalid_name")
    # a 0/1 label map and an opaque RGBA 0/255 mask are binary
    assert put_mask(client, "a.png", png(disc().astype(np.uint8)), image).status_code == 200
    rgba = np.zeros((*SIZE, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[disc(r=3), :3] = 255
    assert put_mask(client, "a.png", png(rgba), image).status_code == 200
    np.testing.assert_array_equal(read_mask(review_dir / "masks/a.png"), disc(r=3))
    assert sorted(p.name for p in (review_dir / "images").iterdir()) == ["a.png"]


def test_stem_clash_is_a_conflict(client: TestClient):
    assert put_mask(client, "a.png", mask_png(disc()), image_bytes()).status_code == 200
    assert_error(put_mask(client, "a.jpg", mask_png(disc()), image_bytes()), 409, "name_conflict")


@pytest.mark.parametrize(("code", "reason"), [(errno.ENOSPC, "disk_full"), (errno.EROFS, "read_only")])
def test_full_disk_or_read_only_folder_is_507_and_keeps_earlier_saves(
    client: TestClient, review_dir: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
):
    assert put_mask(client, "a.png", mask_png(disc()), image_bytes()).status_code == 200
    before = (review_dir / "masks/a.png").read_bytes()

    def fail(*args, **kwargs):
        raise OSError(code, "simulated")

    monkeypatch.setattr(io_utils.os, "replace", fail)
    body = assert_error(put_mask(client, "a.png", mask_png(disc(r=2))), 507, reason)
    assert "earlier saves are intact" in body["error"] and str(review_dir) not in body["error"]
    assert_error(client.put("/v1/reviews/a.png", json={"status": "reject"}), 507, reason)
    monkeypatch.undo()
    assert (review_dir / "masks/a.png").read_bytes() == before
    assert client.get("/v1/reviews/a.png").json()["status"] is None


def jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def folder_files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_save_whose_record_cannot_be_written_leaves_every_file_as_it_was(
    client: TestClient, review_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    assert put_mask(client, "a.png", mask_png(disc()), image_bytes()).status_code == 200
    # c.png has a verdict only, and images/c.jpg is left over from an interrupted older save
    assert client.put("/v1/reviews/c.png", json={"status": "needs_correction"}).status_code == 200
    (review_dir / "images/c.jpg").write_bytes(jpeg_bytes())
    before = folder_files(review_dir)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "simulated")

    monkeypatch.setattr(review, "atomic_write_json", disk_full)
    # a new mask of a saved image, a first save, and a first save over an older file of another extension
    for name, image in (("a.png", None), ("b.png", image_bytes(1)), ("c.png", image_bytes(2))):
        body = assert_error(put_mask(client, name, mask_png(disc(r=3)), image), 507, "disk_full")
        assert "nothing new was saved" in body["error"]
    assert folder_files(review_dir) == before  # no file replaced or removed, no image without a record, no temporary
    monkeypatch.undo()
    # once the record can be written, the new mask replaces the old one and c.png its older c.jpg
    for name, image in (("a.png", None), ("c.png", image_bytes(2))):
        assert put_mask(client, name, mask_png(disc(r=3)), image).status_code == 200
    assert sorted(p.name for p in (review_dir / "images").iterdir()) == ["a.png", "c.png"]
    assert sorted(p.name for p in (review_dir / "masks").iterdir()) == ["a.png", "c.png"]
    np.testing.assert_array_equal(read_mask(review_dir / "masks/a.png"), disc(r=3))
    assert check_dataset(review_dir).pairs == 2


def test_a_mask_sent_with_another_image_of_the_same_name_is_a_conflict(client: TestClient, review_dir: Path):
    # two images named case.png (from two subfolders of one opened folder) must not share one record
    assert put_mask(client, "case.png", mask_png(disc()), image_bytes(0)).status_code == 200
    before = folder_files(review_dir)
    body = assert_error(put_mask(client, "case.png", mask_png(disc(r=3)), image_bytes(1)), 409, "image_conflict")
    assert "different image" in body["error"] and str(review_dir) not in body["error"]
    assert folder_files(review_dir) == before
    # the same image again (the page sends it with every save) replaces the mask
    assert put_mask(client, "case.png", mask_png(disc(r=3)), image_bytes(0)).status_code == 200
    np.testing.assert_array_equal(read_mask(review_dir / "masks/case.png"), disc(r=3))
    assert (review_dir / "images/case.png").read_bytes() == image_bytes(0)


def test_a_damaged_review_file_is_a_server_error_on_every_route_until_it_is_restored(
    client: TestClient, review_dir: Path
):
    assert put_mask(client, "m.png", mask_png(disc()), image_bytes()).status_code == 200
    assert client.put("/v1/reviews/s0.png", json={"status": "accept"}).status_code == 200
    good = (review_dir / "review.json").read_bytes()
    (review_dir / "review.json").write_bytes(good[: len(good) // 2])  # truncated while the server runs
    answers = [
        client.get("/v1/reviews"),
        client.get("/v1/reviews/s0.png"),
        client.put("/v1/reviews/s0.png", json={"status": "reject"}),
        put_mask(client, "m.png", mask_png(disc(r=3))),
        client.get("/v1/reviews/m.png/mask"),
        client.get("/v1/reviews/export", params={"format": "csv"}),
    ]
    for answer in answers:
        body = assert_error(answer, 500, "review_unreadable")
        assert "review.json" in body["error"] and str(review_dir) not in body["error"] and "/tmp" not in body["error"]
    assert (review_dir / "review.json").read_bytes() == good[: len(good) // 2]  # nothing wrote over it
    (review_dir / "review.json").write_bytes(good)
    assert client.get("/v1/reviews/s0.png").json()["status"] == "accept"
    np.testing.assert_array_equal(read_mask(review_dir / "masks/m.png"), disc())


def test_exports(client: TestClient, tmp_path: Path):
    put_mask(client, "b.png", mask_png(disc()), image_bytes())
    client.put("/v1/reviews/b.png", json={"status": "needs_correction", "note": "edge, left"})
    client.put("/v1/reviews/a.png", json={"status": "reject"})
    answer = client.get("/v1/reviews/export", params={"format": "csv"})
    assert answer.headers["content-type"].startswith("text/csv")
    assert 'filename="review.csv"' in answer.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert [(r["file"], r["status"], r["note"]) for r in rows] == [
        ("a.png", "reject", ""),
        ("b.png", "needs_correction", "edge, left"),
    ]
    assert rows[1]["dice_vs_model"] and rows[1]["mask_saved"].endswith("Z")
    data = client.get("/v1/reviews/export", params={"format": "json"}).json()
    assert data["summary"]["corrected"] == 1 and len(data["records"]) == 2
    archive = client.get("/v1/reviews/export", params={"format": "zip"})
    assert archive.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(archive.content)) as unzip:
        unzip.extractall(tmp_path / "unpacked")
    assert check_dataset(tmp_path / "unpacked").ok
    assert json.loads((tmp_path / "unpacked/review.json").read_text())["summary"]["records"] == 2
    assert_error(client.get("/v1/reviews/export", params={"format": "xlsx"}), 422, "invalid_parameter")


def test_without_a_review_folder_the_routes_say_so(service: InferenceService):
    with TestClient(create_app(service, WebSettings())) as plain:
        assert plain.get("/v1/health").json()["review"] is False
        body = assert_error(plain.get("/v1/reviews"), 404, "not_found")
        assert "--review-dir" in body["error"]
        assert_error(plain.put("/v1/reviews/a.png", json={"status": "accept"}), 404, "not_found")


def test_review_routes_need_the_token(service: InferenceService, review_dir: Path):
    with TestClient(create_app(service, WebSettings(token="s3cret", review_dir=review_dir))) as guarded:
        for method, path in (("get", "/v1/reviews"), ("get", "/v1/reviews/export"), ("get", "/v1/reviews/a.png"),
                             ("put", "/v1/reviews/a.png"), ("put", "/v1/reviews/a.png/mask"),
                             ("get", "/v1/reviews/a.png/mask")):  # fmt: skip
            assert_error(getattr(guarded, method)(path), 401, "unauthorized")
        auth = {"Authorization": "Bearer s3cret"}
        assert guarded.put("/v1/reviews/a.png", json={"status": "accept"}, headers=auth).status_code == 200


def test_openapi_lists_every_status_each_route_returns(client: TestClient):
    paths = client.get("/openapi.json").json()["paths"]

    def statuses(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert {"200", "401", "404", "500"} <= statuses("/v1/reviews", "get")
    assert {"200", "400", "401", "404", "500"} <= statuses("/v1/reviews/{name}", "get")
    assert {"200", "400", "401", "404", "413", "422", "500", "507"} <= statuses("/v1/reviews/{name}", "put")
    assert {"200", "400", "401", "404", "409", "413", "415", "422", "500", "507"} <= statuses(
        "/v1/reviews/{name}/mask", "put"
    )
    assert {"200", "400", "401", "404", "500"} <= statuses("/v1/reviews/{name}/mask", "get")
    assert {"200", "401", "404", "422", "500"} <= statuses("/v1/reviews/export", "get")
    assert {"200", "401", "404"} <= statuses("/v1/samples/{name}", "get")
    assert {"200", "401", "404"} <= statuses("/v1/samples/{name}/mask", "get")
    assert {"200", "401", "503"} <= statuses("/v1/health", "get")


def test_serve_review_dir_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from polypseg.cli import serve_cmd
    from polypseg.cli.main import app

    calls: list = []
    monkeypatch.setattr(serve_cmd, "run_server", lambda web_app, *args, **kwargs: calls.append(web_app))
    weights = save_tiny_checkpoint(tmp_path / "ckpt")
    base = ["serve", "--model", str(weights.with_suffix("")), "--device", "cpu", "--port", "0"]
    runner = CliRunner()
    result = runner.invoke(app, [*base, "--review-dir", str(tmp_path / "new" / "review")])
    assert result.exit_code == 0, result.output
    assert calls[-1].state.review_store.root == tmp_path / "new" / "review" and (tmp_path / "new/review").is_dir()
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, [*base, "--review-dir", str(tmp_path / "file")])
    assert result.exit_code == 2 and "a file, not a folder" in result.output and "Traceback" not in result.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other/review.json").write_text("[]")
    result = runner.invoke(app, [*base, "--review-dir", str(tmp_path / "other")])
    assert result.exit_code == 2 and "not a polypseg review file" in result.output


def test_serve_refuses_an_unreadable_review_file_in_one_line_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from typer.testing import CliRunner

    from polypseg.cli.main import app

    loaded: list = []
    monkeypatch.setattr(InferenceService, "from_checkpoint", classmethod(lambda cls, *a, **k: loaded.append(a)))
    (tmp_path / "review").mkdir()
    (tmp_path / "review/review.json").write_text('{"format": "polypseg-rev')
    result = CliRunner().invoke(app, ["serve", "--port", "0", "--review-dir", str(tmp_path / "review")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: --review-dir") and "review.json" in lines[0] and "damaged" in lines[0]
    assert not loaded
