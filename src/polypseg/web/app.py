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
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
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
from polypseg.web.service import BadExplainRequest, ExplainUnavailable, InferenceService, ServiceBusy
from polypseg.web.validation import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    CorruptImage,
    MaskMismatch,
    NoFile,
    NotAnImage,
    UploadError,
    UploadTooLarge,
    check_size,
    clean_reason,
    decode_image_bytes,
    decode_mask_bytes,
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
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
COLORMAPS = ("viridis", "cividis", "magma", "jet")


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


class HeadMiddleware:
    """Answer ``HEAD`` wherever ``GET`` is answered: the same status and headers, no body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


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
    # Two uploads (image and optional ground-truth mask) may share one multipart body.
    app.add_middleware(BodyLimitMiddleware, limit=2 * settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(HeadMiddleware)
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

    @app.exception_handler(BadExplainRequest)
    async def _bad_explain(request: Request, error: BadExplainRequest) -> JSONResponse:
        return _error(422, str(error), "invalid_parameter")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return _error(422, f"invalid {where or 'request'}: {first.get('msg', 'bad value')}", "invalid_parameter")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Routing errors (unknown path, wrong method) get the same JSON shape as every other error.
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        elif error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            message = f"method {request.method} not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
        else:
            message = str(error.detail)
        code = HTTP_CODES.get(error.status_code, "http_error")
        return _error(error.status_code, message, code, dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error ({type(error).__name__}); see the server log", "internal_error")

    # ------------------------------------------------------------------ helpers

    async def read_upload(request: Request, media: str = "image", with_mask: bool = False) -> tuple[bytes, str, tuple[bytes, str] | None]:
        """``(data, name, mask)``: the upload, its file name, and (``with_mask``) the optional
        multipart field ``mask`` as ``(data, name)``."""
        content_type = request.headers.get("content-type", "").lower()
        mask = None
        article = "an" if media[0] in "aeiou" else "a"
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=2 if with_mask else 1, max_fields=16)
            except UploadError:
                raise
            except Exception as error:  # noqa: BLE001 - malformed multipart framing
                raise CorruptImage(f"cannot parse the multipart upload ({clean_reason(error)})") from None
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                uploads = [v for k, v in form.multi_items() if isinstance(v, UploadFile) and k != "mask"]
                if not uploads:
                    raise NoFile(f"no file in the upload: send the {media} as multipart field 'file'")
                upload = uploads[0]
            name = Path(upload.filename or "upload").name
            data = await upload.read(settings.max_upload_bytes + 1)
            await upload.close()
            given_mask = form.get("mask") if with_mask else None
            if isinstance(given_mask, UploadFile):
                mask_name = Path(given_mask.filename or "mask").name
                mask_data = await given_mask.read(settings.max_upload_bytes + 1)
                await given_mask.close()
                check_size(mask_data, mask_name, settings.max_upload_bytes)
                mask = (mask_data, mask_name)
        elif content_type.startswith((f"{media}/", "application/octet-stream")) or not content_type:
            name = "request body"
            data = await request.body()
        else:
            raise NotAnImage(
                f"content type '{content_type}' is not {article} {media}; send {media} bytes or multipart field 'file'"
            )
        check_size(data, name, settings.max_upload_bytes)
        return data, name, mask

    async def run_job(kind: str, data: bytes, name: str, threshold: float | None, fold: int | None = None) -> tuple[np.ndarray, Any]:
        info = probe_image(data, name, settings.max_pixels)
        ticket = service.reserve(info.pixels)
        with ticket:
            image = await run_in_threadpool(decode_image_bytes, data, name, settings.max_pixels)
            future = service.submit(ticket, kind, image, threshold, fold)
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
    segment_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "mask": {
                                "type": "string",
                                "format": "binary",
                                "description": "Optional ground-truth mask of the same size (> 127 = polyp): the answer adds dice and iou.",
                            },
                        },
                        "required": ["file"],
                    }
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    @app.post(
        "/v1/segment",
        tags=["inference"],
        openapi_extra=segment_body,
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
        """Segment one image: mask, polyp area and mean confidence; Dice and IoU against an optional ground-truth `mask`."""
        started = time.perf_counter()
        data, name, mask_upload = await read_upload(request, with_mask=True)
        image, prediction = await run_job("segment", data, name, threshold)
        body = await run_in_threadpool(_segment_body, image, prediction, mask_format, include_probability, include_image)
        if mask_upload is not None:
            truth = await run_in_threadpool(decode_mask_bytes, mask_upload[0], mask_upload[1], settings.max_pixels)
            if truth.shape != image.shape[:2]:
                raise MaskMismatch(
                    f"{mask_upload[1]}: the mask is {truth.shape[1]}x{truth.shape[0]}, the image {image.shape[1]}x{image.shape[0]}"
                )
            body.update(_overlap(np.asarray(prediction.mask, dtype=bool), truth), mask_name=mask_upload[1])
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
        include_overlay: bool = Query(True, description="Add the heatmap blended 50 % over the image, PNG."),
        heatmap_bits: int = Query(8, description="Bit depth of the grayscale heatmap PNG: 8 or 16."),
        colormap: Literal[COLORMAPS] = Query(  # type: ignore[valid-type]
            "viridis", description="Colours of the overlay: viridis, cividis, magma (perceptually uniform, colour-blind safe) or jet."
        ),
        fold: int | None = Query(None, ge=0, description="Explain one fold's model only (0-based); default: every model, heatmaps averaged."),
    ) -> dict[str, Any]:
        """Grad-CAM of the served mask (final decoder block).

        The target is each model's logits summed inside the mask `/v1/segment` answers at the same
        threshold (for a CV run: the ensemble's mask); the heatmaps of the ensemble's models are averaged.
        """
        started = time.perf_counter()
        if heatmap_bits not in (8, 16):
            raise _ApiError(422, f"invalid heatmap_bits: {heatmap_bits} (use 8 or 16)", "invalid_parameter")
        service.check_explain(fold)
        data, name, _ = await read_upload(request)
        used = service.threshold if threshold is None else threshold
        image, result = await run_job("explain", data, name, used, fold)
        body = await run_in_threadpool(_explain_body, image, result, include_overlay, heatmap_bits, colormap, used)
        explained = list(result.models)
        body.update(
            name=name,
            threshold=used,
            layer=service.explain_layer,
            method="gradcam",
            target=(
                "sum of logits inside the served mask (probability >= threshold"
                + (", the ensemble's mean probability" if service.n_models > 1 else "")
                + ")"
            ),
            models=explained,
            model_index=explained[0] if len(explained) == 1 else None,
            combine="mean of the per-model heatmaps" if len(explained) > 1 else None,
            colormap=colormap if include_overlay else None,
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
        data, name, _ = await read_upload(request, media="video")
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
        """Names of the sample images (by default the bundled Kvasir-SEG sample; see its NOTICE), and
        which of them have a ground-truth mask (``GET /v1/samples/{name}/mask``)."""
        images, masks = _sample_folders(samples_dir)
        names = [p.name for p in _list_samples(images)]
        stems = _mask_index(masks)
        return {"samples": names, "masks": [n for n in names if Path(n).stem in stems]}

    @app.get("/v1/samples/{name}", responses={401: ERROR_RESPONSES[401]}, tags=["samples"], dependencies=[Depends(require_token)])
    async def sample(name: str) -> FileResponse:
        """One sample image, by name as listed by ``GET /v1/samples``."""
        images, _ = _sample_folders(samples_dir)
        by_name = {p.name: p for p in _list_samples(images)}
        if name not in by_name:
            raise _ApiError(404, f"no sample named '{name}'", "not_found")
        return FileResponse(by_name[name])

    @app.get("/v1/samples/{name}/mask", responses={401: ERROR_RESPONSES[401]}, tags=["samples"], dependencies=[Depends(require_token)])
    async def sample_mask(name: str) -> FileResponse:
        """The ground-truth mask of one sample image (same file stem in the data set's ``masks/`` folder)."""
        images, masks = _sample_folders(samples_dir)
        if name not in {p.name for p in _list_samples(images)}:
            raise _ApiError(404, f"no sample named '{name}'", "not_found")
        path = _mask_index(masks).get(Path(name).stem)
        if path is None:
            raise _ApiError(404, f"sample '{name}' has no ground-truth mask", "not_found")
        return FileResponse(path)

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


def _explain_body(
    image: np.ndarray, result: Any, include_overlay: bool, heatmap_bits: int, colormap: str = "viridis", threshold: float = 0.5
) -> dict[str, Any]:
    heatmap = np.asarray(result.heatmap, dtype=np.float32)
    as_int = encoding.unit_to_uint16(heatmap) if heatmap_bits == 16 else encoding.unit_to_uint8(heatmap)
    served = np.asarray(result.probability) >= threshold
    body: dict[str, Any] = {
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "heatmap_bits": heatmap_bits,
        "heatmap_png_base64": encoding.png_base64(as_int),
        "heatmap_max": float(heatmap.max()) if heatmap.size else 0.0,
        "mask_area_pixels": int(np.count_nonzero(served)),
    }
    if include_overlay:
        body["overlay_png_base64"] = encoding.png_base64(encoding.heatmap_overlay(image, heatmap, cmap=colormap))
    return body


def _overlap(prediction: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Dice and IoU of two boolean masks; both 1.0 when both are empty."""
    inter = int(np.count_nonzero(prediction & truth))
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(truth))
    union = total - inter
    return {
        "dice": 1.0 if total == 0 else 2.0 * inter / total,
        "iou": 1.0 if union == 0 else inter / union,
        "truth_area_pixels": int(np.count_nonzero(truth)),
    }


def _default_samples_dir() -> Path | None:
    try:
        from polypseg.sample_data import sample_dataset_path

        return sample_dataset_path() / "images"
    except Exception:  # noqa: BLE001 - samples are a convenience; the API works without them
        return None


def _sample_folders(folder: Path | None) -> tuple[Path | None, Path | None]:
    """(images, masks) of a samples folder: a data set folder with ``images/`` (and ``masks/``), or an
    images folder whose sibling ``masks/`` holds the ground truth."""
    if folder is None:
        return None, None
    if (folder / "images").is_dir():
        return folder / "images", folder / "masks"
    return folder, folder.parent / "masks"


def _mask_index(masks: Path | None) -> dict[str, Path]:
    """Ground-truth masks by file stem."""
    return {p.stem: p for p in _list_samples(masks)}


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
