"""``GET /v1/health`` and ``/v1/model``: the state of the service and what it serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from polypseg._version import __version__
from polypseg.web.dependencies import TOKEN_REQUIRED, ServiceDep, SettingsDep
from polypseg.web.schemas import ERROR_RESPONSES

router = APIRouter(prefix="/v1", tags=["service"], dependencies=TOKEN_REQUIRED, responses={401: ERROR_RESPONSES[401]})


@router.get("/health")
async def health(service: ServiceDep, settings: SettingsDep) -> JSONResponse:
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


@router.get("/model")
async def model(service: ServiceDep) -> dict[str, Any]:
    """Architecture, training data, metrics and threshold of the served model."""
    return service.describe()
