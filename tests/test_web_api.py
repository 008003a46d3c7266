"""The HTTP API with FastAPI's test client: answers match the library, bad input is a clear 4xx."""

from __future__ import annotations

import base64
import io
import re
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from polypseg.core.precision import autocast
from polypseg.data.images import resize_image
from polypseg.explain.gradcam import RegionLogitSum, explain_images, grad_cam, prepare_batch, to_original_size
from polypseg.inference.predictor import Prediction
from polypseg.models.checkpoint import save_checkpoint
from polypseg.models.factory import count_parameters, create_model
from polypseg.web import encoding
from polypseg.web.app import STATIC_DIR, WebSettings, create_app
from polypseg.web.service import InferenceService, ServiceBusy
from polypseg.web.validation import decode_image_bytes

from helpers import tiny_config

THRESHOLD = 0.45


def make_checkpoint(path: Path, threshold: float = THRESHOLD) -> Path:
    config = tiny_config(image_size=64)
    torch.manual_seed(0)
    model = create_model(config.model)
    return save_checkpoint(path, model, config, metrics={"dice": 0.61, "iou": 0.5}, threshold=threshold)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def service(checkpoint: Path) -> InferenceService:
    return InferenceService.from_checkpoint(checkpoint, device="cpu", max_batch=4)


@pytest.fixture()
def client(service: InferenceService):
    with TestClient(create_app(service, WebSettings())) as test_client:
        yield test_client


def image_rgb(height: int = 40, width: int = 52, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 90, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    image[(yy - height // 2) ** 2 + (xx - width // 2) ** 2 <= (min(height, width) // 4) ** 2] = [210, 120, 110]
    return image


def encode(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def post(client: TestClient, endpoint: str, data: bytes, name: str = "x.png", **params) -> dict:
    response = client.post(endpoint, params=params, files={"file": (name, data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    return response.json()


def png_array(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width x height`` RGB with almost no pixel data (a bomb)."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------- answers


def test_segment_matches_the_predictor(client: TestClient, service: InferenceService):
    image = image_rgb()
    body = post(client, "/v1/segment", encode(image), include_probability="true")
    expected = service.predictor.predict([image])[0]
    mask = png_array(body["mask_png_base64"])
    assert mask.shape == (40, 52) and set(np.unique(mask)) <= {0, 255}
    assert (body["width"], body["height"]) == (52, 40)
    assert body["threshold"] == pytest.approx(THRESHOLD)
    np.testing.assert_array_equal(mask > 0, expected.mask)
    assert body["area_pixels"] == int(expected.mask.sum())
    assert body["area_fraction"] == pytest.approx(expected.mask.mean())
    assert body["mean_confidence"] == pytest.approx(float(expected.mean_confidence), abs=1e-6)
    probability = png_array(body["probability_png_base64"]).astype(int)
    assert np.abs(probability - np.rint(expected.probability * 255)).max() <= 1
    assert "uncertainty_png_base64" not in body  # a single checkpoint has no fold disagreement


def test_rle_decodes_to_the_png_mask(client: TestClient):
    data = encode(image_rgb(seed=3))
    png_mask = png_array(post(client, "/v1/segment", data, threshold=0.5)["mask_png_base64"]) > 0
    body = post(client, "/v1/segment", data, mask_format="rle", threshold=0.5)
    assert "mask_png_base64" not in body and body["mask_rle"]["size"] == [40, 52]
    assert 0 < png_mask.sum() < png_mask.size, "the test image should give a partial mask"
    np.testing.assert_array_equal(encoding.rle_decode(body["mask_rle"]), png_mask)


def test_rle_is_coco_column_major():
    mask = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)
    # column-major: col0 = 0,0; col1 = 1,1; col2 = 1,0 -> runs 2 zeros, 3 ones, 1 zero
    assert encoding.rle_encode(mask) == {"size": [2, 3], "counts": [2, 3, 1]}
    assert encoding.rle_encode(np.ones((2, 2), bool))["counts"] == [0, 4]
    np.testing.assert_array_equal(encoding.rle_decode(encoding.rle_encode(mask)), mask)


def test_threshold_parameter_rethresholds(client: TestClient, service: InferenceService):
    image = image_rgb(seed=5)
    data = encode(image)
    probability = service.predictor.predict([image])[0].probability
    low, high = np.quantile(probability, [0.2, 0.8])
    areas = []
    for threshold in (round(float(low), 3), round(float(high), 3)):
        body = post(client, "/v1/segment", data, threshold=threshold)
        assert body["threshold"] == pytest.approx(threshold)
        assert body["area_pixels"] == int((probability >= threshold).sum())
        areas.append(body["area_pixels"])
    assert areas[0] > areas[1]


def test_explain_matches_library_grad_cam(client: TestClient, service: InferenceService):
    image = image_rgb(seed=7)
    data = encode(image)
    body = post(client, "/v1/explain", data)
    heatmaps, _ = explain_images(service.predictor.models[0], [image], image_size=64, threshold=THRESHOLD)
    heatmap = png_array(body["heatmap_png_base64"])
    assert heatmap.shape == (40, 52) and heatmap.dtype == np.uint8
    assert np.abs(heatmap.astype(int) - np.rint(heatmaps[0] * 255)).max() <= 1
    assert png_array(body["overlay_png_base64"]).shape == (40, 52, 3)
    assert body["threshold"] == pytest.approx(THRESHOLD) and body["layer"] == "decoder.final"
    assert body["models"] == [0] and body["model_index"] == 0
    assert body["mask_area_pixels"] == post(client, "/v1/segment", data)["area_pixels"]
    deep = post(client, "/v1/explain", data, heatmap_bits=16, include_overlay="false")
    heatmap16 = png_array(deep["heatmap_png_base64"])
    assert heatmap16.dtype in (np.uint16, np.int32) and "overlay_png_base64" not in deep
    assert np.abs(heatmap16.astype(np.int64) - np.rint(heatmaps[0] * 65535)).max() <= 300


def test_explain_overlay_uses_a_colour_blind_safe_palette(client: TestClient):
    image = image_rgb(seed=7)
    for colormap in ("viridis", "cividis", "jet"):
        params = {} if colormap == "viridis" else {"colormap": colormap}
        body = post(client, "/v1/explain", encode(image), **params)
        heatmap = png_array(body["heatmap_png_base64"]).astype(np.float32) / 255
        expected = encoding.heatmap_overlay(image, heatmap, cmap=colormap)
        assert body["colormap"] == colormap
        assert np.abs(png_array(body["overlay_png_base64"]).astype(int) - expected).max() <= 2, colormap


def test_raw_body_upload(client: TestClient):
    response = client.post("/v1/segment", content=encode(image_rgb(), "JPEG"), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "request body"


@pytest.mark.parametrize(
    "kind",
    ["gray", "rgba", "palette", "gray16", "tiff16", "tiff_rgb", "bmp", "webp"],
)
def test_converted_formats_are_accepted(client: TestClient, kind: str):
    rgb = image_rgb(height=30, width=34, seed=11)
    gray = rgb[:, :, 0]
    if kind == "gray":
        data = encode(gray)
    elif kind == "rgba":
        data = encode(np.dstack([rgb, np.full(gray.shape, 128, np.uint8)]))
    elif kind == "palette":
        data = encode(np.asarray(Image.fromarray(rgb).convert("P")))
    elif kind == "gray16":
        data = encode(gray.astype(np.uint16) * 257)
    elif kind in ("tiff16", "tiff_rgb"):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, gray.astype(np.uint16) * 257 if kind == "tiff16" else rgb)
        data = buffer.getvalue()
    else:
        data = encode(rgb, kind.upper())
    body = post(client, "/v1/segment", data, name=f"upload.{kind}")
    assert (body["width"], body["height"]) == (34, 30)
    if kind in ("gray16", "tiff16"):
        # 16-bit is scaled by its range, so v * 257 must segment exactly like 8-bit v
        reference = post(client, "/v1/segment", encode(gray))
        assert body["mask_png_base64"] == reference["mask_png_base64"]


# ----------------------------------------------------------------------------------- bad input


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


BAD_UPLOADS = {
    "text": (b"patient notes, not an image", "notes.txt", 415, "not_an_image"),
    "empty": (b"", "empty.png", 400, "empty_upload"),
    "bad_png_header": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "header.png", 400, "corrupt_image"),
    "bad_jpeg_header": (b"\xff\xd8\xff" + b"\x00" * 50, "header.jpg", 400, "corrupt_image"),
    "bad_webp_header": (b"RIFF\x00\x00\x00\x00WEBP" + b"\x00" * 20, "header.webp", 400, "corrupt_image"),
    "truncated_jpeg": (truncated(encode(image_rgb(), "JPEG")), "cut.jpg", 400, "corrupt_image"),
    "truncated_png": (truncated(encode(image_rgb())), "cut.png", 400, "corrupt_image"),
    "corrupt_tiff": (b"II*\x00" + b"\xff" * 64, "bad.tif", 400, "corrupt_image"),
    "bomb": (png_header_only(30000, 30000), "bomb.png", 413, "too_many_pixels"),
    "pdf": (b"%PDF-1.4\n" + b"0" * 100, "scan.pdf", 415, "not_an_image"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_clear_4xx(client: TestClient, case: str):
    data, name, status, code = BAD_UPLOADS[case]
    for endpoint in ("/v1/segment", "/v1/explain"):
        response = client.post(endpoint, files={"file": (name, data, "application/octet-stream")})
        assert response.status_code == status, response.text
        body = response.json()
        assert body["code"] == code
        assert "\n" not in body["error"] and len(body["error"]) < 300
        # no Python object reprs or addresses, and the file name once (the page adds nothing to it)
        assert "0x" not in body["error"] and " object" not in body["error"] and "<" not in body["error"], body["error"]
        assert body["error"].count(name) == 1, body["error"]
    assert client.get("/v1/health").json()["status"] == "ok"
    assert post(client, "/v1/segment", encode(image_rgb()))["width"] == 52


def test_upload_and_pixel_limits(service: InferenceService):
    settings = WebSettings(max_upload_bytes=3000, max_pixels=2000)
    with TestClient(create_app(service, settings)) as client:
        big = encode(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8))
        assert len(big) > 3000
        response = client.post("/v1/segment", files={"file": ("big.png", big, "image/png")})
        assert response.status_code == 413 and response.json()["code"] == "upload_too_large"
        # no Content-Length (chunked): the limit applies while the body streams in
        response = client.post(
            "/v1/segment", content=iter([big[:2000], big[2000:]]), headers={"Content-Type": "image/png"}
        )
        assert response.status_code == 413 and response.json()["code"] == "upload_too_large"
        small_but_wide = encode(np.zeros((10, 250), np.uint8))  # 2500 px > 2000
        response = client.post("/v1/segment", files={"file": ("wide.png", small_but_wide, "image/png")})
        assert response.status_code == 413 and response.json()["code"] == "too_many_pixels"
        assert "wide.png" in response.json()["error"] and "2,500" in response.json()["error"]
        assert (
            client.post(
                "/v1/segment", files={"file": ("ok.png", encode(np.zeros((40, 40), np.uint8)), "image/png")}
            ).status_code
            == 200
        )


def test_bad_parameters_and_requests(client: TestClient):
    data = encode(image_rgb())
    for params in ({"threshold": 1.5}, {"threshold": 0}, {"mask_format": "bmp"}):
        response = client.post("/v1/segment", params=params, files={"file": ("x.png", data, "image/png")})
        assert response.status_code == 422 and next(iter(params)) in response.json()["error"]
    for params in ({"heatmap_bits": 12}, {"fold": 1}, {"fold": -1}, {"colormap": "rainbow"}):
        response = client.post("/v1/explain", params=params, files={"file": ("x.png", data, "image/png")})
        assert response.status_code == 422 and response.json()["code"] == "invalid_parameter", params
    response = client.post("/v1/segment", content=b'{"image": 1}', headers={"Content-Type": "application/json"})
    assert response.status_code == 415 and "application/json" in response.json()["error"]


def test_multipart_without_a_file_is_no_file(client: TestClient):
    not_a_file = {"other": ("", b"", "text/plain")}  # a multipart text field, no file part
    only_a_mask = {"mask": ("m.png", encode(np.zeros((4, 4), np.uint8)), "image/png")}
    for endpoint, files in (
        ("/v1/segment", not_a_file),
        ("/v1/segment", only_a_mask),
        ("/v1/explain", not_a_file),
        ("/v1/segment-video", not_a_file),
    ):
        response = client.post(endpoint, data={"note": "no file"}, files=files)
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "no_file" and "field 'file'" in response.json()["error"]


def test_routing_errors_are_json_and_head_is_answered(client: TestClient):
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json() == {"error": "no such endpoint: GET /v1/nothing (see /docs)", "code": "not_found"}
    response = client.post("/v1/health")
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"
    assert set(response.json()) == {"error", "code"} and "GET" in response.json()["error"]
    response = client.get("/v1/segment")
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"
    assert response.headers["Cache-Control"] == "no-store"
    for path in ("/v1/health", "/v1/model", "/v1/samples", "/"):
        head, get = client.head(path), client.get(path)
        assert head.status_code == 200 == get.status_code, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert client.get("/v1/samples/nope.jpg").json()["code"] == "not_found"


def test_content_type_errors_name_the_media(client: TestClient):
    response = client.post("/v1/segment-video", content=b"{}", headers={"Content-Type": "application/json"})
    assert response.status_code == 415
    assert "is not a video" in response.json()["error"] and " an video" not in response.json()["error"]
    response = client.post("/v1/segment", content=b"{}", headers={"Content-Type": "application/json"})
    assert "is not an image" in response.json()["error"]


def test_segment_with_a_ground_truth_mask_gives_dice(client: TestClient, service: InferenceService):
    image = image_rgb(seed=9)
    prediction = service.predictor.predict([image])[0]
    truth = np.zeros((40, 52), bool)
    truth[10:30, 12:40] = True
    files = {
        "file": ("x.png", encode(image), "image/png"),
        "mask": ("x_mask.png", encode(truth.astype(np.uint8) * 255), "image/png"),
    }
    body = client.post("/v1/segment", files=files).json()
    inter = int((prediction.mask & truth).sum())
    assert body["dice"] == pytest.approx(2 * inter / (prediction.mask.sum() + truth.sum()))
    assert body["iou"] == pytest.approx(inter / (prediction.mask | truth).sum())
    assert body["truth_area_pixels"] == int(truth.sum()) and body["mask_name"] == "x_mask.png"
    # an RGB JPEG mask binarises like the library's read_mask (brightest channel > 127)
    rgb = np.dstack([truth.astype(np.uint8) * 250] * 3)
    jpeg = client.post(
        "/v1/segment", files={"file": files["file"], "mask": ("m.jpg", encode(rgb, "JPEG", quality=95), "image/jpeg")}
    ).json()
    assert jpeg["truth_area_pixels"] == pytest.approx(int(truth.sum()), abs=4)
    assert "dice" not in post(client, "/v1/segment", encode(image))
    wrong = client.post(
        "/v1/segment",
        files={"file": files["file"], "mask": ("small.png", encode(np.zeros((8, 8), np.uint8)), "image/png")},
    )
    assert wrong.status_code == 400 and wrong.json()["code"] == "mask_mismatch" and "small.png" in wrong.json()["error"]


def test_decoder_refuses_bombs_before_allocating():
    # 100000 x 100000 would be 30 GB if decoded; refused from the header alone.
    with pytest.raises(Exception) as error:
        decode_image_bytes(png_header_only(100_000, 100_000), "huge.png")
    assert getattr(error.value, "status_code", None) == 413 and "huge.png" in str(error.value)


# ----------------------------------------------------------------------------------- queue


class BlockingPredictor:
    """Stands in for the predictor: blocks until released, fails on all-zero images."""

    threshold = 0.5
    image_size = 32
    device = "cpu"
    metadata: dict = {}

    def __init__(self) -> None:
        self.release = threading.Event()
        self.models = [torch.nn.Conv2d(3, 1, 1)]
        self.batch_sizes: list[int] = []

    def predict(self, images):
        self.release.wait(10)
        self.batch_sizes.append(len(images))
        if any(not image.any() for image in images):
            raise RuntimeError("boom")
        return [
            Prediction(np.full(image.shape[:2], image[0, 0, 0] / 255, np.float32), self.threshold) for image in images
        ]


def test_full_queue_answers_503_with_retry_after():
    predictor = BlockingPredictor()
    service = InferenceService(predictor, max_queue=2, max_batch=2)
    with TestClient(create_app(service)) as client:
        tickets = [service.reserve(10), service.reserve(10)]
        with pytest.raises(ServiceBusy):
            service.reserve(10)
        response = client.post("/v1/segment", files={"file": ("x.png", encode(image_rgb()), "image/png")})
        assert response.status_code == 503
        assert response.json()["error"] == "server busy, retry later"
        assert int(response.headers["Retry-After"]) > 0
        for ticket in tickets:
            ticket.release()
        assert service.pending == 0
        predictor.release.set()


def test_worker_batches_and_isolates_failures():
    predictor = BlockingPredictor()
    service = InferenceService(predictor, max_queue=8, max_batch=4)
    service.start()
    try:
        images = [np.full((4, 4, 3), value, np.uint8) for value in (1, 0, 3, 4)]
        futures = [service.submit(service.reserve(16), "segment", image) for image in images]
        predictor.release.set()
        assert futures[0].result(10).probability[0, 0] == pytest.approx(1 / 255)
        assert futures[3].result(10).probability[0, 0] == pytest.approx(4 / 255)
        with pytest.raises(RuntimeError):
            futures[1].result(10)
        assert max(predictor.batch_sizes) > 1, "queued jobs should run as one batch"
        assert service.pending == 0
    finally:
        service.stop()


def test_explain_without_a_torch_model_is_501():
    predictor = BlockingPredictor()
    predictor.release.set()
    service = InferenceService(predictor, explain_model=None)
    with TestClient(create_app(service)) as client:
        response = client.post("/v1/explain", files={"file": ("x.png", encode(image_rgb()), "image/png")})
        assert response.status_code == 501 and response.json()["code"] == "explain_unavailable"
        assert service.pending == 0
        assert (
            client.post("/v1/segment", files={"file": ("x.png", encode(image_rgb()), "image/png")}).status_code == 200
        )


# ----------------------------------------------------------------------------------- auth


def test_token_protects_every_api_call(service: InferenceService):
    with TestClient(create_app(service, WebSettings(token="s3cret"))) as client:
        data = encode(image_rgb())
        calls = [
            ("get", "/v1/health", {}),
            ("get", "/v1/model", {}),
            ("get", "/v1/samples", {}),
            ("post", "/v1/segment", {"files": {"file": ("x.png", data, "image/png")}}),
            ("post", "/v1/explain", {"files": {"file": ("x.png", data, "image/png")}}),
        ]
        for method, path, kwargs in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = getattr(client, method)(path, headers=headers, **kwargs)
                assert response.status_code == 401, (path, headers)
                assert response.json()["code"] == "unauthorized" and response.headers["WWW-Authenticate"] == "Bearer"
            response = getattr(client, method)(path, headers={"Authorization": "Bearer s3cret"}, **kwargs)
            assert response.status_code == 200, (path, response.text)
        assert client.get("/").status_code == 200  # the page itself holds no data; it asks for the token


def test_no_token_means_open_api(client: TestClient):
    assert client.get("/v1/health").status_code == 200


# ----------------------------------------------------------------------------------- service info


def test_health_model_and_openapi(client: TestClient, service: InferenceService):
    health = client.get("/v1/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.headers["Cache-Control"] == "no-store"
    info = client.get("/v1/model").json()
    assert info["architecture"]["encoder"] == "resnet18" and info["architecture"]["arch"] == "unet"
    assert info["architecture"]["parameters"] == count_parameters(service.predictor.models[0])
    assert info["architecture"]["input_size"] == 64
    assert info["threshold"] == pytest.approx(THRESHOLD)
    assert info["metrics"]["validation"]["dice"] == pytest.approx(0.61) and "test" not in info["metrics"]
    assert info["training"]["recipe"] == "demo"
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/segment", "/v1/explain", "/v1/health", "/v1/model", "/v1/samples"):
        assert path in paths
    assert "multipart/form-data" in paths["/v1/segment"]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    for asset in re.findall(r'(?:src|href)="([^"]+)"', docs.text):
        assert asset.startswith("/"), asset
        assert client.get(asset).status_code == 200, asset


def test_samples(client: TestClient):
    listing = client.get("/v1/samples").json()
    names = listing["samples"]
    assert len(names) >= 10 and all(name.endswith(".jpg") for name in names)
    response = client.get(f"/v1/samples/{names[0]}")
    assert response.status_code == 200 and response.content[:3] == b"\xff\xd8\xff"
    for bad in ("nope.jpg", "..%2F..%2FNOTICE.md", "..%2Fmasks%2F" + names[0].replace(".jpg", ".png")):
        assert client.get(f"/v1/samples/{bad}").status_code == 404
    # the bundled sample has a ground-truth mask for every image
    assert listing["masks"] == names
    mask = client.get(f"/v1/samples/{names[0]}/mask")
    assert mask.status_code == 200 and mask.content[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(io.BytesIO(response.content)))
    assert np.asarray(Image.open(io.BytesIO(mask.content))).shape[:2] == image.shape[:2]
    assert client.get("/v1/samples/nope.jpg/mask").status_code == 404


def test_samples_folder_with_and_without_masks(service: InferenceService, tmp_path: Path):
    from helpers import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "set", n=3)
    (root / "masks" / "case02.png").unlink()
    for folder in (root, root / "images"):  # a data set folder, or its images/ folder
        with TestClient(create_app(service, WebSettings(samples_dir=folder))) as client:
            listing = client.get("/v1/samples").json()
            assert listing == {
                "samples": ["case00.jpg", "case01.jpg", "case02.jpg"],
                "masks": ["case00.jpg", "case01.jpg"],
            }
            assert client.get("/v1/samples/case01.jpg/mask").status_code == 200
            missing = client.get("/v1/samples/case02.jpg/mask")
            assert missing.status_code == 404 and "no ground-truth mask" in missing.json()["error"]


def cvc_layout_folder(root: Path) -> Path:
    """A tiny CVC-ClinicDB-style folder: TIFF frames in Original/, TIFF masks (0/255) in Ground Truth/."""
    rng = np.random.default_rng(3)
    (root / "Original").mkdir(parents=True)
    (root / "Ground Truth").mkdir()
    for stem in ("1", "2"):
        tifffile.imwrite(root / "Original" / f"{stem}.tif", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    mask = np.zeros((20, 24), np.uint8)
    mask[5:10, 6:12] = 255
    tifffile.imwrite(root / "Ground Truth" / "1.tif", mask)
    return root


def test_samples_folder_in_the_cvc_clinicdb_layout_serves_tiff_masks_as_png(service: InferenceService, tmp_path: Path):
    root = cvc_layout_folder(tmp_path / "cvc")
    for folder in (root, root / "Original"):  # the data set folder, or its Original/ folder
        with TestClient(create_app(service, WebSettings(samples_dir=folder))) as client:
            assert client.get("/v1/samples").json() == {"samples": ["1.tif", "2.tif"], "masks": ["1.tif"]}
            image = client.get("/v1/samples/1.tif")
            assert image.status_code == 200 and image.content == (root / "Original/1.tif").read_bytes()
            mask = client.get("/v1/samples/1.tif/mask")  # browsers cannot show TIFF: the mask comes as PNG
            assert mask.status_code == 200 and mask.headers["content-type"] == "image/png"
            shown = np.asarray(Image.open(io.BytesIO(mask.content)))
            np.testing.assert_array_equal(shown, tifffile.imread(root / "Ground Truth/1.tif"))
            assert client.get("/v1/samples/2.tif/mask").status_code == 404
            # the page sends the sample image as stored to /v1/segment, which reads TIFF
            segmented = client.post("/v1/segment", files={"file": ("1.tif", image.content, "image/tiff")})
            assert segmented.status_code == 200 and segmented.json()["width"] == 24


def test_serve_says_when_the_samples_folder_holds_no_images(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from polypseg.cli.main import app

    calls = fake_server(monkeypatch)
    (tmp_path / "empty").mkdir()
    base = ["serve", "--model", str(checkpoint), "--device", "cpu", "--port", "0", "--samples"]
    result = CliRunner().invoke(app, [*base, str(tmp_path / "empty")])
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert result.exit_code == 0 and len(warnings) == 1 and "no images" in warnings[0] and "empty" in warnings[0]
    result = CliRunner().invoke(app, [*base, str(cvc_layout_folder(tmp_path / "cvc"))])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert len(calls) == 2


# ----------------------------------------------------------------------------------- offline page


EXTERNAL = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.IGNORECASE)


def test_page_loads_nothing_from_other_hosts(client: TestClient):
    files = [p for p in STATIC_DIR.iterdir() if p.suffix in (".html", ".js", ".css", ".svg")]
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in files}
    for path in files:
        text = path.read_text()
        # an SVG's xmlns is a namespace name, never fetched
        text = re.sub(r'xmlns(:\w+)?="[^"]*"', "", text)
        assert not EXTERNAL.search(text), f"{path.name} references another host: {EXTERNAL.search(text).group(0)}"
        assert "@import" not in text and "fonts.g" not in text
    page = client.get("/")
    assert page.status_code == 200
    for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert asset.startswith("/") and not asset.startswith("//"), asset
        assert client.get(asset).status_code == 200, asset
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "connect-src 'self'" in csp and "img-src 'self' data: blob:" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script>" not in page.text  # inline scripts would be blocked by the CSP


# ----------------------------------------------------------------------------------- CLI


def test_serve_refuses_a_bad_model_with_one_line(tmp_path: Path):
    from polypseg.cli.main import app

    runner = CliRunner()
    missing = runner.invoke(app, ["serve", "--model", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere" in missing.output and "Traceback" not in missing.output
    bad = make_checkpoint(tmp_path / "broken")
    bad.write_bytes(b"not safetensors")
    result = runner.invoke(app, ["serve", "--model", str(bad)])
    assert result.exit_code == 2 and "broken" in result.output and "Traceback" not in result.output


def test_serve_names_the_shipped_model_when_it_fails_to_load(monkeypatch: pytest.MonkeyPatch):
    from polypseg.cli.main import app

    def broken(cls, *args, **kwargs):
        raise RuntimeError("weights truncated\nsecond line")

    monkeypatch.setattr(InferenceService, "from_checkpoint", classmethod(broken))
    result = CliRunner().invoke(app, ["serve", "--port", "0", "--device", "cpu"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == "error: cannot load the shipped model: RuntimeError: weights truncated"


def fake_server(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record what ``serve`` would run instead of running it."""
    from polypseg.cli import serve_cmd

    calls: list[dict] = []

    def record(web_app, sock, host, port, log_level):
        calls.append({"app": web_app, "host": host, "port": port, "bound": sock.getsockname()[1]})

    monkeypatch.setattr(serve_cmd, "run_server", record)
    return calls


def test_serve_binds_loopback_by_default_and_warns_without_token(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    from polypseg.cli.main import app

    calls = fake_server(monkeypatch)
    # fixed ports that are free right now (the test binds them for real)
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    monkeypatch.delenv("POLYPSEG_TOKEN", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--model", str(checkpoint), "--device", "cpu", "--port", str(ports[0])])
    assert result.exit_code == 0, result.output
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == ports[0] == calls[-1]["bound"]
    assert "warning" not in result.output
    result = runner.invoke(
        app, ["serve", "--model", str(checkpoint), "--device", "cpu", "--host", "0.0.0.0", "--port", str(ports[1])]
    )
    assert result.exit_code == 0 and "without authentication" in result.output
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["port"] == ports[1]
    monkeypatch.setenv("POLYPSEG_TOKEN", "from-env")
    result = runner.invoke(
        app,
        [
            "serve",
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--max-upload-mb",
            "5",
        ],
    )
    assert result.exit_code == 0 and "without authentication" not in result.output
    settings = calls[-1]["app"].state.settings
    assert settings.token == "from-env" and settings.max_upload_bytes == 5 * 1024 * 1024


def test_serve_port_zero_prints_the_real_port(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    from polypseg.cli.main import app

    calls = fake_server(monkeypatch)
    result = CliRunner().invoke(app, ["serve", "--model", str(checkpoint), "--device", "cpu", "--port", "0"])
    assert result.exit_code == 0, result.output
    port = calls[-1]["bound"]
    assert port > 0 and calls[-1]["port"] == port
    assert f"http://127.0.0.1:{port}/" in result.output and ":0/" not in result.output


def test_serve_refuses_a_taken_port_before_loading_the_model(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    from polypseg.cli.main import app

    calls = fake_server(monkeypatch)
    loaded: list[object] = []
    monkeypatch.setattr(InferenceService, "from_checkpoint", classmethod(lambda cls, *a, **k: loaded.append(a)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--model", str(checkpoint), "--device", "cpu", "--port", str(port)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:") and "already in use" in lines[0]
    )
    assert "serving" not in result.output and not loaded and not calls


@pytest.mark.parametrize("value", ["1.0", "1", "0", "-0.2", "1.5"])
def test_serve_threshold_must_be_inside_zero_one(checkpoint: Path, monkeypatch: pytest.MonkeyPatch, value: str):
    from polypseg.cli.main import app

    calls = fake_server(monkeypatch)
    result = CliRunner().invoke(
        app, ["serve", "--model", str(checkpoint), "--device", "cpu", "--port", "0", "--threshold", value]
    )
    assert result.exit_code == 2 and not calls
    assert "--threshold" in result.output and "between 0 and 1" in result.output


# ----------------------------------------------------------------------------------- CV run ensemble


def make_run(root: Path) -> Path:
    import json

    for fold in range(2):
        config = tiny_config(image_size=64)
        torch.manual_seed(fold)
        save_checkpoint(
            root / f"fold_{fold}" / "best", create_model(config.model), config, metrics={"dice": 0.5 + fold / 10}
        )
    (root / "config.json").write_text(
        json.dumps({"run": config.to_dict(), "data": "/secret/site/kvasir-seg", "folds": 2, "seed": 0})
    )
    (root / "splits.json").write_text(json.dumps({"seed": 0, "k": 2, "stems": [], "folds": []}))
    summary = {
        "threshold": 0.55,
        "n_images": 10,
        "folds": 2,
        "mean_std": {"at_chosen": {"dice": [0.7, 0.05]}},
        "pooled": {"auc": 0.9, "at": {"0.5": {}}},
    }
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def test_precision_bf16_with_onnxruntime_applies_to_grad_cam_only(tiny_checkpoint: Path):
    # the session's shared checkpoint: its ONNX export is made once for every engine test
    service = InferenceService.from_checkpoint(tiny_checkpoint, device="cpu", backend="onnxruntime", precision="bf16")
    with TestClient(create_app(service)) as client:
        info = client.get("/v1/model").json()
    assert info["backend"] == "onnxruntime"
    assert info["precision"] == {"segmentation": "fp32", "explain": "bf16"}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_an_exported_model_on_onnxruntime_refuses_bf16_that_would_apply_to_nothing(tmp_path: Path, backend: str):
    """A checkpoint keeps bf16 for Grad-CAM (above); an exported model has no Grad-CAM, and onnxruntime
    segments in fp32, so the request is refused by name before anything is loaded."""
    from polypseg.inference.loading import PredictorError

    model = tmp_path / "model.onnx"
    model.write_bytes(b"never read: refused before loading")
    expected = "precision bf16: onnxruntime computes in fp32, and model.onnx has no Grad-CAM for it to apply to"
    with pytest.raises(PredictorError, match=re.escape(expected)):
        InferenceService.from_checkpoint(model, device="cpu", backend=backend, precision="bf16")


def test_cv_run_serves_the_fold_ensemble(tmp_path: Path):
    run = make_run(tmp_path / "run")
    service = InferenceService.from_checkpoint(run, device="cpu")
    image = image_rgb(seed=2)
    with TestClient(create_app(service)) as client:
        body = post(client, "/v1/segment", encode(image))
        expected = service.predictor.predict([image])[0]
        assert body["n_models"] == 2 and body["threshold"] == pytest.approx(0.55)
        disagreement = png_array(body["uncertainty_png_base64"]).astype(int)
        assert disagreement.shape == (40, 52) and disagreement.max() > 0
        assert np.abs(disagreement - np.rint(np.clip(2 * expected.uncertainty, 0, 1) * 255)).max() <= 1
        assert body["mean_uncertainty"] == pytest.approx(float(expected.uncertainty.mean()), rel=1e-5)

        # Grad-CAM explains the ensemble's mask, the one on screen: both folds, that mask as target.
        cam = post(client, "/v1/explain", encode(image))
        assert cam["models"] == [0, 1] and "model_index" not in cam and cam["combine"]
        assert cam["mask_area_pixels"] == body["area_pixels"]
        expected = served_mask_cam(service, image, 0.55, [0, 1])
        assert np.abs(png_array(cam["heatmap_png_base64"]).astype(int) - np.rint(expected * 255)).max() <= 1
        one = post(client, "/v1/explain", encode(image), fold=1)
        assert one["models"] == [1] and one["model_index"] == 1
        expected = served_mask_cam(service, image, 0.55, [1])
        assert np.abs(png_array(one["heatmap_png_base64"]).astype(int) - np.rint(expected * 255)).max() <= 1

        info = client.get("/v1/model").json()
        assert info["ensemble"]["models"] == 2
        assert info["training"]["data"] == "kvasir-seg" and "secret" not in str(info)
        assert info["training"]["folds"] == 2
        assert info["cross_validation"]["mean_std"]["at_chosen"]["dice"] == [0.7, 0.05]
        assert info["cross_validation"]["pooled_auc"] == 0.9


def served_mask_cam(service: InferenceService, image: np.ndarray, threshold: float, folds: list[int]) -> np.ndarray:
    """Reference: each fold's Grad-CAM with the served (ensemble) mask, probability >= threshold at the
    model's input size, as target; the heatmaps averaged. Same precision rule as the library (auto)."""
    size = service.predictor.image_size
    resized = np.array(resize_image(image, size))[None]  # writable, as the service's np.stack gives
    served = torch.from_numpy(service.predictor.predict_resized(resized))
    batch = prepare_batch(resized, size, "cpu")
    with autocast("cpu", "auto"):
        maps = [
            grad_cam(service.predictor.models[k], batch, RegionLogitSum(served >= threshold)).float() for k in folds
        ]
    return to_original_size(torch.stack(maps).mean(0)[0], served[0], image.shape[:2])[0]


def fold_probabilities(service: InferenceService, image: np.ndarray) -> list[torch.Tensor]:
    """Each fold model's own probability map at the model's input size, computed like the predictor."""
    size = service.predictor.image_size
    batch = prepare_batch(np.array(resize_image(image, size))[None], size, "cpu", precision="fp32")
    with torch.no_grad(), autocast("cpu", "auto"):
        return [torch.sigmoid(m(batch).float())[0, 0] for m in service.predictor.models]


def test_explain_follows_the_served_ensemble_mask_and_threshold(tmp_path: Path):
    """At a threshold where the ensemble's mask is empty there is nothing to explain, even where
    one fold alone would still predict polyp (the old heatmap explained fold 0's own mask)."""
    service = InferenceService.from_checkpoint(make_run(tmp_path / "run"), device="cpu")
    image = image_rgb(seed=2)
    data = encode(image)
    per_fold = fold_probabilities(service, image)
    ensemble_max = float(torch.stack(per_fold).mean(0).max())
    fold0_max = float(per_fold[0].max())
    assert fold0_max > ensemble_max + 0.002, "the test needs a pixel where fold 0 alone is more confident"
    high = round((fold0_max + ensemble_max) / 2, 4)
    with TestClient(create_app(service)) as client:
        assert post(client, "/v1/segment", data, threshold=high)["area_pixels"] == 0
        for params in ({}, {"fold": 0}):
            empty = post(client, "/v1/explain", data, threshold=high, **params)
            assert empty["threshold"] == pytest.approx(high)
            assert empty["heatmap_max"] == 0 and empty["mask_area_pixels"] == 0, params
            assert png_array(empty["heatmap_png_base64"]).max() == 0
        # the heatmap changes with the threshold, as the mask on screen does
        low_threshold = round(float(np.quantile(torch.stack(per_fold).mean(0).numpy(), 0.3)), 3)
        low = post(client, "/v1/explain", data, threshold=low_threshold)
        middle = post(client, "/v1/explain", data, threshold=0.55)
        assert low["mask_area_pixels"] == post(client, "/v1/segment", data, threshold=low_threshold)["area_pixels"]
        assert low["mask_area_pixels"] > middle["mask_area_pixels"]
        assert low["heatmap_max"] == 1
        reference = served_mask_cam(service, image, low_threshold, [0, 1])
        assert np.abs(png_array(low["heatmap_png_base64"]).astype(int) - np.rint(reference * 255)).max() <= 1


def test_model_info_has_per_fold_metrics(tiny_cv_run: Path):
    import json

    service = InferenceService.from_checkpoint(tiny_cv_run, device="cpu")
    with TestClient(create_app(service)) as client:
        info = client.get("/v1/model").json()
    metrics = info["metrics"]
    assert sorted(metrics) == ["fold_0", "fold_1"]
    for fold in ("fold_0", "fold_1"):
        stored = json.loads((tiny_cv_run / fold / "metrics.json").read_text())
        test = metrics[fold]["test"]
        assert test["n_images"] == stored["n_test"] > 0
        key = f"{test['threshold']:g}"
        assert test["dice"] == pytest.approx(stored["at"][key]["dice"]) and "iou" in test
        assert "val_dice" in metrics[fold]["validation"]  # the checkpoint's inner-validation score
    assert info["explain"]["models"] == 2 and info["cross_validation"]["folds"] == 2
    # one checkpoint of the run: its own validation and held-out metrics, not nested per fold
    single = InferenceService.from_checkpoint(tiny_cv_run / "fold_1" / "best", device="cpu").describe()["metrics"]
    assert single["test"]["n_images"] > 0 and "val_dice" in single["validation"]


# ----------------------------------------------------------------------------------- video


def write_video(path: Path, frames: int = 12, size: tuple[int, int] = (48, 64)) -> Path:
    """A small H.264 MP4 (MPEG-4 Part 2 where libx264 is missing) of a square moving right."""
    import av

    height, width = size
    with av.open(str(path), "w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 40, np.uint8)
            image[10:30, 5 + 3 * i : 25 + 3 * i] = [220, 120, 110]
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_upload_gives_per_frame_results(service: InferenceService, tmp_path: Path):
    from polypseg.inference.video import read_frames

    path = write_video(tmp_path / "clip.mp4")
    frames = [frame for _, _, frame in read_frames(path)]
    expected = service.predictor.predict(frames[:10])
    with TestClient(create_app(service, WebSettings(max_video_frames=10))) as client:
        response = client.post(
            "/v1/segment-video",
            params={"include_masks": "true"},
            files={"file": ("clip.mp4", path.read_bytes(), "video/mp4")},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["width"], body["height"], body["fps"]) == (64, 48, 10.0)
        assert body["frames"] == 10 and body["frames_limited"] and "first 10 frames" in body["warning"]
        assert [row["frame"] for row in body["per_frame"]] == list(range(10))
        assert body["per_frame"][0]["iou_with_previous"] is None
        for row, mask_rle, prediction in zip(body["per_frame"], body["masks_rle"], expected, strict=True):
            mask = encoding.rle_decode(mask_rle)
            assert mask.shape == (48, 64) and row["area_pixels"] == int(mask.sum())
            assert abs(row["area_pixels"] - prediction.area_pixels) <= 0.01 * mask.size
        ious = [row["iou_with_previous"] for row in body["per_frame"][1:]]
        assert body["consistency"] == pytest.approx(float(np.mean(ious)), abs=1e-5)

        raw = client.post("/v1/segment-video", content=path.read_bytes(), headers={"Content-Type": "video/mp4"})
        assert raw.status_code == 200 and "masks_rle" not in raw.json()
        for data, name in ((b"junk" * 100, "junk.mp4"), (path.read_bytes()[:300], "cut.mp4")):
            bad = client.post("/v1/segment-video", files={"file": (name, data, "video/mp4")})
            assert bad.status_code == 415 and bad.json()["code"] == "not_a_video" and name in bad.json()["error"]
            assert "polypseg-upload" not in bad.json()["error"] and "/tmp" not in bad.json()["error"]
        # a still image is not a video, whatever FFmpeg would make of it
        for data, name in ((encode(image_rgb(), "JPEG"), "still.jpg"), (encode(image_rgb()), "still.png")):
            bad = client.post("/v1/segment-video", files={"file": (name, data, "video/mp4")})
            assert bad.status_code == 415 and bad.json()["code"] == "not_a_video", bad.text
            assert bad.json()["error"].startswith(f"{name}: a ") and "/v1/segment" in bad.json()["error"]
        assert client.get("/v1/health").json()["limits"]["max_video_frames"] == 10


def test_level_map_reproduces_the_served_mask_at_every_grid_threshold():
    from polypseg.web.threshold_levels import GRID, level_map

    rng = np.random.default_rng(0)
    edges = np.concatenate([GRID, np.nextafter(GRID, np.float32(0)), np.nextafter(GRID, np.float32(1))])
    probability = np.concatenate([rng.random(500, dtype=np.float32), edges, [0.0, 1.0]]).astype(np.float32)
    levels = level_map(probability.reshape(1, -1))
    for k in range(1, 100):
        threshold = k / 100
        served = Prediction(probability=probability.reshape(1, -1), threshold=threshold).mask
        np.testing.assert_array_equal(levels >= k, served, err_msg=f"threshold {threshold}")


def test_video_threshold_levels_match_a_rerun_at_each_threshold(service: InferenceService, tmp_path: Path):
    path = write_video(tmp_path / "clip.mp4", frames=5)
    upload = {"file": ("clip.mp4", path.read_bytes(), "video/mp4")}
    with TestClient(create_app(service)) as client:
        body = client.post("/v1/segment-video", params={"include_levels": "true"}, files=upload).json()
        levels = body["threshold_levels"]
        assert levels["thresholds"] == [round(k / 100, 2) for k in range(1, 100)]
        assert len(levels["frames"]) == body["frames"] == 5 and levels["frames"][0]["iou_with_previous"] is None
        maps = [decode_png(frame["levels_png_base64"]) for frame in levels["frames"]]
        assert all(m.dtype == np.uint8 and m.shape == (48, 64) for m in maps)
        spread = np.concatenate([m.ravel() for m in maps])
        thresholds = sorted({int(np.quantile(spread, q)) for q in (0.1, 0.5, 0.9)} - {0}) + [99]
        assert len(thresholds) >= 3, thresholds  # masks of different sizes are compared
        for k in thresholds:
            rerun = client.post(
                "/v1/segment-video", params={"include_masks": "true", "threshold": f"{k / 100:.2f}"}, files=upload
            ).json()
            for index, (row, rle) in enumerate(zip(rerun["per_frame"], rerun["masks_rle"], strict=True)):
                np.testing.assert_array_equal(maps[index] >= k, encoding.rle_decode(rle))
                frame = levels["frames"][index]
                assert frame["area_pixels"][k - 1] == row["area_pixels"]
                assert frame["mean_confidence"][k - 1] == pytest.approx(row["mean_confidence"], abs=2e-6)
                if index:
                    assert frame["iou_with_previous"][k - 1] == pytest.approx(row["iou_with_previous"], abs=2e-6)


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def test_video_cut_short_keeps_the_frames_decoded_before_the_error(
    service: InferenceService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """3 frames decode, then the file is damaged: all 3 are segmented (they were still waiting for a batch)."""
    import polypseg.inference.video as video

    path = write_video(tmp_path / "clip.mp4")
    real = video.read_frames

    def damaged(source):
        for index, seconds, frame in real(source):
            if index == 3:
                raise video.VideoError(f"{source}: invalid data found when processing input")
            yield index, seconds, frame

    monkeypatch.setattr(video, "read_frames", damaged)
    assert service.max_batch > 3
    with TestClient(create_app(service)) as client:
        response = client.post("/v1/segment-video", files={"file": ("cut.mp4", path.read_bytes(), "video/mp4")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["frames"] == 3 and [row["frame"] for row in body["per_frame"]] == [0, 1, 2]
    assert body["warning"].startswith("decoding stopped after 3 frames") and "/tmp" not in body["warning"]


def test_serve_precision_reaches_segmentation_and_grad_cam(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    from polypseg.cli.main import app
    from polypseg.explain import gradcam as explain

    calls = fake_server(monkeypatch)
    result = CliRunner().invoke(
        app, ["serve", "--model", str(checkpoint), "--device", "cpu", "--port", "0", "--precision", "fp32"]
    )
    assert result.exit_code == 0, result.output
    served = calls[-1]["app"].state.service
    assert served.precision == "fp32" and served.predictor.precision == "fp32"
    assert served.describe()["precision"] == {"segmentation": "fp32", "explain": "fp32"}
    seen = []
    original = explain.GradCAMDriver.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("precision"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(explain.GradCAMDriver, "__init__", spy)
    served.start()
    try:
        ticket = served.reserve(40 * 52)
        served.submit(ticket, "explain", image_rgb()).result(timeout=60)
    finally:
        served.stop()
    assert seen == ["fp32"]
    bad = CliRunner().invoke(app, ["serve", "--model", str(checkpoint), "--port", "0", "--precision", "fp16"])
    assert bad.exit_code == 2 and "--precision fp16: choose auto, fp32, bf16" in bad.output


def test_serve_option_choices_match_the_library():
    from polypseg.cli.serve_cmd import SERVE_BACKENDS, SERVE_PRECISIONS
    from polypseg.core.precision import PRECISIONS
    from polypseg.inference.predictor import BACKENDS

    assert set(SERVE_BACKENDS) == set(BACKENDS) and set(SERVE_PRECISIONS) == set(PRECISIONS)


def test_video_timeout_bounds_each_chunk_not_the_whole_video(monkeypatch):
    # A fake clock that moves only while the model runs: each one-frame chunk "takes" 50 s of the
    # 80 s allowed, the four together 200 s. No real waiting, so the test does not depend on speed.
    clock = {"now": 0.0}
    monkeypatch.setattr(
        "polypseg.web.service.time", SimpleNamespace(monotonic=lambda: clock["now"], sleep=time.sleep, time=time.time)
    )
    predictor = BlockingPredictor()
    predictor.release.set()
    model_call = predictor.predict

    def predict_taking_50s(images):
        clock["now"] += 50.0
        return model_call(images)

    predictor.predict = predict_taking_50s
    service = InferenceService(predictor, max_queue=4, max_batch=1)
    service.start()
    try:
        frames = [np.full((4, 4, 3), value, np.uint8) for value in (1, 2, 3, 4)]
        answers = list(service.segment_stream(frames, timeout=80.0))
        assert [a.probability[0, 0] for a in answers] == pytest.approx([v / 255 for v in (1, 2, 3, 4)])
        assert clock["now"] == 200.0  # the video as a whole ran well past the timeout
    finally:
        service.stop()


def test_float32_probabilities_give_exactly_the_served_mask(client: TestClient, service: InferenceService):
    image = image_rgb(seed=7)
    data = encode(image)
    probability = service.predictor.predict([image])[0].probability
    for threshold in (0.3, round(float(np.median(probability)), 2), 0.7):
        body = post(client, "/v1/segment", data, threshold=threshold, include_probability="true",
                    probability_format="float32")  # fmt: skip
        exact = np.frombuffer(base64.b64decode(body["probability_f32_base64"]), dtype="<f4").reshape(40, 52)
        mask = png_array(body["mask_png_base64"]) > 0
        # the page's rule, p >= threshold in float32, reproduces the served mask pixel for pixel
        np.testing.assert_array_equal(exact >= np.float32(threshold), mask)
        assert body["area_pixels"] == int(mask.sum()) and "probability_png_base64" not in body


def test_refusals_name_the_real_problem(service: InferenceService):
    with TestClient(create_app(service, WebSettings(token="s3cret", max_upload_bytes=3000))) as guarded:
        missing = guarded.get("/v1/health").json()
        assert missing["code"] == "unauthorized" and "needs an access token" in missing["error"]
        wrong = guarded.get("/v1/health", headers={"Authorization": "Bearer nope"}).json()
        assert wrong["code"] == "unauthorized" and "refused" in wrong["error"] and "needs" not in wrong["error"]
        auth = {"Authorization": "Bearer s3cret"}
        big = encode(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8))
        for answer in (
            guarded.post("/v1/segment", files={"file": ("big.png", big, "image/png")}, headers=auth),
            guarded.post("/v1/segment", content=big, headers={**auth, "Content-Type": "image/png"}),
        ):
            assert answer.status_code == 413, answer.text
            assert f"{len(big):,} bytes is over the upload limit of 3,000 bytes" in answer.json()["error"]
        text = guarded.post("/v1/segment-video", content=b"hello", headers={**auth, "Content-Type": "text/plain"})
        assert (
            text.status_code == 415 and text.json()["code"] == "not_a_video" and "not a video" in text.json()["error"]
        )
        truncated = b'--XYZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\nabc'
        for body, content_type in ((truncated, "multipart/form-data; boundary=XYZ"), (b"junk", "multipart/form-data")):
            answer = guarded.post("/v1/segment", content=body, headers={**auth, "Content-Type": content_type})
            assert answer.status_code == 400 and answer.json()["code"] == "bad_multipart", answer.text
            assert answer.json()["error"].startswith("cannot parse the multipart upload")
