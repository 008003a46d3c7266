"""The one error shape of the API, ``{"error": ..., "code": ...}``, and the handlers that produce it.

Bad uploads become 4xx answers, a full queue 503 with ``Retry-After``, routing errors (unknown
path, wrong method) and unexpected exceptions the same JSON shape as every other error.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from polypseg.data.review import ReviewError, StorageError
from polypseg.web.service import BadExplainRequest, ExplainUnavailable, ServiceBusy
from polypseg.web.validation import UploadError

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 2
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    """An error answer raised from a handler or dependency: status, message and machine-readable code."""

    def __init__(self, status_code: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.headers = headers or {}


def error_response(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON answer ``{"error": message, "code": code}`` with ``status``."""
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


def busy_response(message: str = "server busy, retry later") -> JSONResponse:
    """503 with ``Retry-After``: the queue or the memory budget is full."""
    return error_response(503, message, "busy", {"Retry-After": str(RETRY_AFTER_SECONDS)})


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error_response(error.status_code, str(error), error.code, error.headers)


async def _upload_error(request: Request, error: UploadError) -> JSONResponse:
    return error_response(error.status_code, str(error), error.code)


async def _service_busy(request: Request, error: ServiceBusy) -> JSONResponse:
    return busy_response(str(error))


async def _no_explain(request: Request, error: ExplainUnavailable) -> JSONResponse:
    return error_response(501, str(error), "explain_unavailable")


async def _bad_explain(request: Request, error: BadExplainRequest) -> JSONResponse:
    return error_response(422, str(error), "invalid_parameter")


# A review store error's kind -> (status, code).
REVIEW_STATUS = {
    "bad_name": (400, "invalid_name"),
    "bad_mask": (400, "mask_mismatch"),
    "not_found": (404, "not_found"),
    "conflict": (409, "name_conflict"),
    "image_conflict": (409, "image_conflict"),
    "unreadable": (500, "review_unreadable"),  # the server's review.json, not the request, is at fault
    "invalid": (422, "invalid_parameter"),
}


async def _review_error(request: Request, error: ReviewError) -> JSONResponse:
    if isinstance(error, StorageError):
        return error_response(507, str(error), error.reason)
    status, code = REVIEW_STATUS.get(error.kind, (422, "invalid_parameter"))
    return error_response(status, str(error), code)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
    message = f"invalid {where or 'request'}: {first.get('msg', 'bad value')}"
    return error_response(422, message, "invalid_parameter")


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
    return error_response(error.status_code, message, code, dict(error.headers or {}))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return error_response(500, f"internal error ({type(error).__name__}); see the server log", "internal_error")


def add_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every error into the API's JSON error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(UploadError, _upload_error)
    app.add_exception_handler(ServiceBusy, _service_busy)
    app.add_exception_handler(ExplainUnavailable, _no_explain)
    app.add_exception_handler(BadExplainRequest, _bad_explain)
    app.add_exception_handler(ReviewError, _review_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
