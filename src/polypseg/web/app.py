"""FastAPI app: the JSON API under ``/v1`` and the page of our own under ``/``.

Everything is served from this process: page assets from ``web/static`` and the OpenAPI docs
assets from the ``fastapi-offline`` package, so nothing is ever loaded from another host.
Bad uploads become 4xx JSON errors ``{"error": ..., "code": ...}``; a full queue becomes 503
with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from polypseg import __version__
from polypseg.data import IMAGE_EXTENSIONS
from polypseg.web import encoding
from polypseg.web.schemas import (
    ERROR_RESPONSES,
    ErrorBody,
    ExplainResult,
    SegmentResult,
)
from polypseg.web.service import ExplainUnavailable, InferenceService, ServiceBusy
from polypseg.web.validation import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    CorruptImage,
    NotAnImage,
    UploadError,
    UploadTooLarge,
    check_size,
    decode_image_bytes,
    probe_image,
)
from polypseg.web.video_jobs import DEFAULT_MAX_FRAMES, segment_video_bytes

log = logging.getLogger(__name__)

STATIC_DIR = Path(str(files("polypseg.web") / "static"))
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; media-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Swagger UI sets inline styles; scripts stay same-origin only.
DOCS_CSP = PAGE_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
RETRY_AFTER_SECONDS = 2
MULTIPART_OVERHEAD = 64 * 1024


@dataclass
class WebSettings:
    """Limits and options of one app instance (``polypseg serve`` flags)."""

    token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    request_timeout: float = 120.0
    samples_dir: Path | None = None
    max_video_frames: int = DEFAULT_MAX_FRAMES


class _ApiError(Exception):
    def __init__(self, status_code: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.headers = headers or {}


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


def _busy(message: str = "server busy, retry later") -> JSONResponse:
    return _error(503, message, "busy", {"Retry-After": str(RETRY_AFTER_SECONDS)})


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes while they stream in, before any parsing."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _error(413, f"request body of {int(declared):,} bytes is over the upload limit", "upload_too_large")(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise UploadTooLarge("request body is over the upload limit")
            return message

        await self.app(scope, limited_receive, send)


class SecurityHeadersMiddleware:
    """CSP on pages; no caching of API answers (they describe patient images)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        csp = DOCS_CSP if path.startswith("/docs") else PAGE_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"content-security-policy", csp.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                if path.startswith("/v1/"):
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(service: InferenceService, settings: WebSettings | None = None, manage_service: bool = True) -> FastAPI:
    """Build the app around a (not yet started) :class:`InferenceService`.

    With ``manage_service`` the app starts the worker on startup and stops it on shutdown.
    """
    settings = settings or WebSettings()
    samples_dir = settings.samples_dir if settings.samples_dir is not None else _default_samples_dir()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_service:
            service.start()
        try:
            yield
        finally:
            if manage_service:
                await run_in_threadpool(service.stop)

    app = FastAPI(
        title="polypseg",
        version=__version__,
        description=(
            "Polyp segmentation with Grad-CAM explanations. Research software, not a medical device. "
            "Send an image as multipart field `file` or as the raw request body (`Content-Type: image/...`)."
        ),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(SecurityHeadersMiddleware)

    bearer = HTTPBearer(auto_error=False, description="Needed only when the server was started with a token.")

    async def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), settings.token.encode()):
            raise _ApiError(401, "missing or wrong token: send 'Authorization: Bearer <token>'", "unauthorized", {"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ error handling

    @app.exception_handler(_ApiError)
    async def _api_error(request: Request, error: _ApiError) -> JSONResponse:
        return _error(error.status_code, str(error), error.code, error.headers)

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, error: UploadError) -> JSONResponse:
        return _error(error.status_code, str(error), error.code)

    @app.exception_handler(ServiceBusy)
    async def _service_busy(request: Request, error: ServiceBusy) -> JSONResponse:
        return _busy(str(error))

    @app.exception_handler(ExplainUnavailable)
    async def _no_explain(request: Request, error: ExplainUnavailable) -> JSONResponse:
        return _error(501, str(error), "explain_unavailable")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return _error(422, f"invalid {where or 'request'}: {first.get('msg', 'bad value')}", "invalid_parameter")

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), "http_error", dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error ({type(error).__name__}); see the server log", "internal_error")

    # ------------------------------------------------------------------ helpers

    async def read_upload(request: Request, media: str = "image") -> tuple[bytes, str]:
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=16)
            except UploadError:
                raise
            except Exception as error:  # noqa: BLE001 - malformed multipart framing
                raise CorruptImage(f"cannot parse the multipart upload ({error})") from None
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                uploads = [v for v in form.values() if isinstance(v, UploadFile)]
                if not uploads:
                    raise CorruptImage("no file in the upload: send the image as multipart field 'file'")
                upload = uploads[0]
            name = Path(upload.filename or "upload").name
            data = await upload.read(settings.max_upload_bytes + 1)
            await upload.close()
        elif content_type.startswith((f"{media}/", "application/octet-stream")) or not content_type:
            name = "request body"
            data = await request.body()
        else:
            raise NotAnImage(f"content type '{content_type}' is not an {media}; send {media} bytes or multipart field 'file'")
        check_size(data, name, settings.max_upload_bytes)
        return data, name

    async def run_job(kind: str, data: bytes, name: str, threshold: float | None) -> tuple[np.ndarray, Any]:
        info = probe_image(data, name, settings.max_pixels)
        ticket = service.reserve(info.pixels)
        with ticket:
            image = await run_in_threadpool(decode_image_bytes, data, name, settings.max_pixels)
            future = service.submit(ticket, kind, image, threshold)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), settings.request_timeout)
        except asyncio.TimeoutError:
            future.cancel()
            raise ServiceBusy(f"no answer within {settings.request_timeout:g} s, retry later") from None
        return image, result

    # ------------------------------------------------------------------ API

    threshold_query = Query(None, gt=0.0, lt=1.0, description="Decision threshold; default: the model's (chosen in training).")
    upload_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    @app.post(
        "/v1/segment",
        tags=["inference"],
        openapi_extra=upload_body,
        dependencies=[Depends(require_token)],
        response_model=SegmentResult,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
    )
    async def segment(
        request: Request,
        threshold: float | None = threshold_query,
        mask_format: Literal["png", "rle"] = Query("png", description="png: 8-bit PNG (0/255), base64. rle: COCO uncompressed RLE, column-major."),
        include_probability: bool = Query(False, description="Add the probability map as an 8-bit PNG (round(p*255))."),
        include_image: bool = Query(False, description="Add the decoded input image as JPEG (for display)."),
    ) -> dict[str, Any]:
        """Segment one image: mask, polyp area and mean confidence."""
        started = time.perf_counter()
        data, name = await read_upload(request)
        image, prediction = await run_job("segment", data, name, threshold)
        body = await run_in_threadpool(_segment_body, image, prediction, mask_format, include_probability, include_image)
        body.update(name=name, n_models=service.n_models, seconds=round(time.perf_counter() - started, 4))
        return body

    @app.post(
        "/v1/explain",
        tags=["inference"],
        openapi_extra=upload_body,
        dependencies=[Depends(require_token)],
        response_model=ExplainResult,
        response_model_exclude_none=True,
        responses={**ERROR_RESPONSES, 501: {"model": ErrorBody, "description": "Serving an ONNX model: no Grad-CAM"}},
    )
    async def explain(
        request: Request,
        threshold: float | None = threshold_query,
        include_overlay: bool = Query(True, description="Add the heatmap blended over the image (jet colours), PNG."),
        heatmap_bits: int = Query(8, description="Bit depth of the grayscale heatmap PNG: 8 or 16."),
    ) -> dict[str, Any]:
        """Grad-CAM heatmap of the final decoder block (target: logits summed inside the predicted mask)."""
        started = time.perf_counter()
        if heatmap_bits not in (8, 16):
            raise _ApiError(422, f"invalid heatmap_bits: {heatmap_bits} (use 8 or 16)", "invalid_parameter")
        data, name = await read_upload(request)
        used = service.threshold if threshold is None else threshold
        image, result = await run_job("explain", data, name, used)
        body = await run_in_threadpool(_explain_body, image, result, include_overlay, heatmap_bits)
        body.update(
            name=name,
            threshold=used,
            layer=service.explain_layer,
            method="gradcam",
            target="sum of logits inside the predicted mask",
            model_index=0,
            seconds=round(time.perf_counter() - started, 4),
        )
        return body

    video_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": upload_body["requestBody"]["content"]["multipart/form-data"],
                "video/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    @app.post(
        "/v1/segment-video",
        tags=["inference"],
        openapi_extra=video_body,
        dependencies=[Depends(require_token)],
        responses=ERROR_RESPONSES,
    )
    async def segment_video(
        request: Request,
        threshold: float | None = threshold_query,
        include_masks: bool = Query(False, description="Add each frame's mask as COCO RLE (column-major)."),
    ) -> dict[str, Any]:
        """Segment a short video frame by frame: per-frame polyp area, confidence and IoU with the previous frame.

        Frames share the queue with image requests; only the first ``--max-video-frames`` frames are used.
        """
        data, name = await read_upload(request, media="video")
        return await run_in_threadpool(
            segment_video_bytes,
            service,
            data,
            name,
            threshold,
            settings.max_video_frames,
            settings.max_pixels,
            include_masks,
            settings.request_timeout,
        )

    @app.get("/v1/health", responses={401: ERROR_RESPONSES[401]}, tags=["service"], dependencies=[Depends(require_token)])
    async def health() -> JSONResponse:
        """Liveness and queue state; 503 when the inference worker is not running."""
        body = {
            "status": "ok" if service.alive else "down",
            "queued": service.pending,
            "max_queue": service.max_queue,
            "max_batch": service.max_batch,
            "completed": service.completed,
            "device": service.device,
            "version": __version__,
            "limits": {
                "max_upload_bytes": settings.max_upload_bytes,
                "max_pixels": settings.max_pixels,
                "max_video_frames": settings.max_video_frames,
            },
        }
        return JSONResponse(body, status_code=200 if service.alive else 503)

    @app.get("/v1/model", responses={401: ERROR_RESPONSES[401]}, tags=["service"], dependencies=[Depends(require_token)])
    async def model() -> dict[str, Any]:
        """Architecture, training data, metrics and threshold of the served model."""
        return service.describe()

    @app.get("/v1/samples", responses={401: ERROR_RESPONSES[401]}, tags=["samples"], dependencies=[Depends(require_token)])
    async def samples() -> dict[str, Any]:
        """Names of the bundled sample images (Kvasir-SEG sample; see its NOTICE)."""
        return {"samples": [p.name for p in _list_samples(samples_dir)]}

    @app.get("/v1/samples/{name}", responses={401: ERROR_RESPONSES[401]}, tags=["samples"], dependencies=[Depends(require_token)])
    async def sample(name: str) -> FileResponse:
        """One bundled sample image, by name as listed by ``GET /v1/samples``."""
        by_name = {p.name: p for p in _list_samples(samples_dir)}
        if name not in by_name:
            raise _ApiError(404, f"no sample named '{name}'", "not_found")
        return FileResponse(by_name[name])

    # ------------------------------------------------------------------ page and docs

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    docs_assets = _offline_docs_dir()
    if docs_assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=docs_assets), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs() -> FileResponse:
            return FileResponse(STATIC_DIR / "docs.html", media_type="text/html")

    else:

        @app.get("/docs", include_in_schema=False)
        async def docs_missing() -> RedirectResponse:
            return RedirectResponse("/openapi.json")

    return app


def _segment_body(image: np.ndarray, prediction: Any, mask_format: str, include_probability: bool, include_image: bool) -> dict[str, Any]:
    height, width = image.shape[:2]
    mask = np.asarray(prediction.mask, dtype=bool)
    body: dict[str, Any] = {
        "width": width,
        "height": height,
        "threshold": float(prediction.threshold),
        "area_pixels": int(prediction.area_pixels),
        "area_fraction": float(prediction.area_fraction),
        "mean_confidence": float(prediction.mean_confidence),
        "mask_format": mask_format,
    }
    if mask_format == "rle":
        body["mask_rle"] = encoding.rle_encode(mask)
    else:
        body["mask_png_base64"] = encoding.png_base64(encoding.mask_to_uint8(mask))
    if include_probability:
        body["probability_png_base64"] = encoding.png_base64(encoding.unit_to_uint8(prediction.probability))
    uncertainty = getattr(prediction, "uncertainty", None)
    if uncertainty is not None:
        # Std of the fold probabilities is at most 0.5: PNG value = round(min(2 * std, 1) * 255).
        body["uncertainty_png_base64"] = encoding.png_base64(encoding.unit_to_uint8(np.clip(2.0 * uncertainty, 0, 1)))
        body["mean_uncertainty"] = float(np.mean(uncertainty))
    if include_image:
        body["image_jpeg_base64"] = encoding.jpeg_base64(image)
    return body


def _explain_body(image: np.ndarray, result: Any, include_overlay: bool, heatmap_bits: int) -> dict[str, Any]:
    heatmap = np.asarray(result.heatmap, dtype=np.float32)
    as_int = encoding.unit_to_uint16(heatmap) if heatmap_bits == 16 else encoding.unit_to_uint8(heatmap)
    body: dict[str, Any] = {
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "heatmap_bits": heatmap_bits,
        "heatmap_png_base64": encoding.png_base64(as_int),
        "heatmap_max": float(heatmap.max()) if heatmap.size else 0.0,
    }
    if include_overlay:
        body["overlay_png_base64"] = encoding.png_base64(encoding.heatmap_overlay(image, heatmap))
    return body


def _default_samples_dir() -> Path | None:
    try:
        from polypseg.sample_data import sample_dataset_path

        return sample_dataset_path() / "images"
    except Exception:  # noqa: BLE001 - samples are a convenience; the API works without them
        return None


def _list_samples(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _offline_docs_dir() -> Path | None:
    """Swagger UI assets shipped by the ``fastapi-offline`` package, if installed."""
    try:
        return Path(str(files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
