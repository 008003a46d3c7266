"""``GET /v1/health`` and ``/v1/model``: the state of the service and what it serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from polypseg._version import __version__
from polypseg.web.dependencies import TOKEN_REQUIRED, ReviewStoreDep, ServiceDep, SettingsDep
from polypseg.web.schemas import ERROR_RESPONSES

router = APIRouter(prefix="/v1", tags=["service"], dependencies=TOKEN_REQUIRED, responses={401: ERROR_RESPONSES[401]})


class Health(BaseModel):
    status: str = Field(description="ok, or down when the inference worker is not running (then the status is 503)")
    queued: int
    max_queue: int
    max_batch: int
    completed: int
    device: str
    version: str
    limits: dict[str, int]
    review: bool = Field(description="The server keeps review records and corrected masks (--review-dir)")


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "The inference worker is not running (status: down)"}},
)
async def health(service: ServiceDep, settings: SettingsDep, store: ReviewStoreDep) -> JSONResponse:
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
        "review": store is not None,
    }
    return JSONResponse(body, status_code=200 if service.alive else 503)


@router.get("/model")
async def model(service: ServiceDep) -> dict[str, Any]:
    """Architecture, training data, metrics and threshold of the served model."""
    return service.describe()
