"""FastAPI app: the JSON API under ``/v1`` and the page of our own under ``/``.

``create_app`` only assembles: it puts the service and the settings on ``app.state``, adds the
middleware (:mod:`~polypseg.web.middleware`) and the error handlers (:mod:`~polypseg.web.api_errors`),
and includes the routers of :mod:`polypseg.web.routers`. Bad uploads become 4xx JSON errors
``{"error": ..., "code": ...}``; a full queue becomes 503 with ``Retry-After``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from polypseg._version import __version__
from polypseg.data.review import ReviewStore
from polypseg.web.api_errors import add_error_handlers
from polypseg.web.middleware import BodyLimitMiddleware, HeadMiddleware, SecurityHeadersMiddleware
from polypseg.web.routers import inference, pages, reviews, samples, status
from polypseg.web.routers.pages import STATIC_DIR
from polypseg.web.service import InferenceService
from polypseg.web.settings import WebSettings

__all__ = ["STATIC_DIR", "WebSettings", "create_app"]

MULTIPART_OVERHEAD = 64 * 1024
DESCRIPTION = (
    "Polyp segmentation with Grad-CAM explanations. Research software, not a medical device. "
    "Send an image as multipart field `file` or as the raw request body (`Content-Type: image/...`)."
)


def create_app(service: InferenceService, settings: WebSettings | None = None, manage_service: bool = True) -> FastAPI:
    """Build the app around a (not yet started) :class:`InferenceService`.

    With ``manage_service`` the app starts the worker on startup and stops it on shutdown.
    """
    settings = settings or WebSettings()

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
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    app.state.samples_dir = settings.samples_dir if settings.samples_dir is not None else samples.default_samples_dir()
    app.state.review_store = ReviewStore(settings.review_dir) if settings.review_dir is not None else None
    # Two uploads (image and optional ground-truth mask) may share one multipart body.
    app.add_middleware(BodyLimitMiddleware, limit=2 * settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(HeadMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    add_error_handlers(app)
    for router in (inference.router, status.router, samples.router, reviews.router, pages.router):
        app.include_router(router)
    pages.mount_static(app)
    return app
