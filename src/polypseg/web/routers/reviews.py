"""``/v1/reviews``: a reviewer's verdicts, notes and corrected masks, kept in the ``--review-dir`` folder.

The routes are thin: :class:`polypseg.data.review.ReviewStore` validates names, writes atomically
under a lock and exports; here uploads are read and checked, the model's mask is computed for the
Dice against the reviewer's, and the store's errors become the API's JSON errors.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from polypseg.data.review import KEEP, MAX_NOTE_CHARS, STATUSES, NotReviewed, ReviewError, ReviewStore, check_name
from polypseg.web.api_errors import ApiError
from polypseg.web.dependencies import TOKEN_REQUIRED, ReviewStoreDep, ServiceDep, SettingsDep
from polypseg.web.routers.uploads import run_job
from polypseg.web.schemas import ERROR_RESPONSES, ErrorBody
from polypseg.web.service import ServiceBusy
from polypseg.web.settings import WebSettings
from polypseg.web.validation import (
    BadMultipart,
    MaskMismatch,
    NoFile,
    NotAnImage,
    UploadError,
    check_size,
    clean_reason,
    decode_binary_mask,
    probe_image,
)

Status = Literal["accept", "reject", "needs_correction"]
_NAME = "Image file name (e.g. `case1.jpg`): a plain name with an image extension, no folders."


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    extra = {
        404: "No review record (or corrected mask) for this image, or the server keeps no review folder",
        409: "Another reviewed image has the same file stem, or another image is saved under this name",
        507: "The review folder cannot be written (disk full or read-only); nothing saved before is lost",
        400: "Invalid image name, mask not binary or not the image's size, corrupt or missing upload",
        500: "The review folder's review.json cannot be read or is damaged (code review_unreadable)",
    }
    table: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        if status in extra:
            table[status] = {"model": ErrorBody, "description": extra[status]}
        else:
            table[status] = ERROR_RESPONSES[status]
    return table


router = APIRouter(prefix="/v1", tags=["review"], dependencies=TOKEN_REQUIRED)


class Verdict(BaseModel):
    """A verdict on one image and a free-text note (``null`` note: keep the old one; no ``status``:
    keep the stored verdict, so a note saved alone never undoes a verdict set elsewhere)."""

    status: Status | None = Field(
        None, description=f"One of {', '.join(STATUSES)}; null clears the verdict; left out, the verdict stays."
    )
    note: str | None = Field(None, max_length=MAX_NOTE_CHARS, description="Free text; null keeps the stored note.")

    def status_to_record(self) -> str | None:
        """The status for :meth:`ReviewStore.set_verdict`: :data:`KEEP` where the request left it out."""
        return self.status if "status" in self.model_fields_set else KEEP


class ReviewOut(BaseModel):
    file: str
    status: str | None
    note: str
    created: str = Field(description="ISO 8601 UTC time of the first verdict or mask.")
    updated: str = Field(description="ISO 8601 UTC time of the last change.")
    corrected: bool = Field(description="A corrected mask is saved in masks/.")
    mask_saved: str | None
    dice_vs_model: float | None = Field(description="Dice of the reviewer's mask against the model's mask.")
    threshold: float | None = Field(description="Threshold of the model's mask that Dice compares against.")
    mask_area_pixels: int | None
    model_area_pixels: int | None


class ReviewList(BaseModel):
    summary: dict[str, int]
    records: list[ReviewOut]


@router.get("/reviews", response_model=ReviewList, responses=_responses(401, 404, 500))
async def list_reviews(store: ReviewStoreDep) -> dict[str, Any]:
    """Every review record and the counts per verdict, of corrected masks and of records without a verdict."""
    review = _require(store)
    return {"summary": asdict(review.summary()), "records": [asdict(r) for r in review.records()]}


@router.get(
    "/reviews/export",
    responses={
        **_responses(401, 404, 422, 500),
        200: {
            "content": {"text/csv": {}, "application/json": {}, "application/zip": {}},
            "description": "The review as CSV or JSON, or a zip of the corrected data set",
        },
    },
)
async def export_reviews(
    store: ReviewStoreDep,
    format: Annotated[
        Literal["csv", "json", "zip"],
        Query(description="csv or json: the review records; zip: images/, masks/, review.csv and review.json."),
    ] = "csv",
) -> Response:
    """Export the review: one row per image (file, status, note, Dice against the model's mask,
    timestamps) as CSV or JSON, or the corrected images and masks as a zip (a data set)."""
    review = _require(store)
    if format == "json":
        body, media = (await run_in_threadpool(review.export_json)).encode(), "application/json"
    elif format == "zip":
        body, media = await run_in_threadpool(review.export_zip), "application/zip"
    else:
        body, media = (await run_in_threadpool(review.export_csv)).encode("utf-8"), "text/csv; charset=utf-8"
    filename = f"review.{format}" if format != "zip" else "review-dataset.zip"
    return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/reviews/{name}", response_model=ReviewOut, responses=_responses(400, 401, 404, 500))
async def get_review(name: str, store: ReviewStoreDep) -> dict[str, Any]:
    """One image's review record."""
    return asdict(_require(store).get(name))


@router.put("/reviews/{name}", response_model=ReviewOut, responses=_responses(400, 401, 404, 413, 422, 500, 507))
async def put_verdict(name: str, verdict: Verdict, store: ReviewStoreDep) -> dict[str, Any]:
    """Record a verdict (accept, reject, needs_correction) and a note for one image."""
    review = _require(store)
    status = verdict.status_to_record()
    if status == KEEP and verdict.note is None:
        raise ReviewError("nothing to record: give a status, a note or both")
    record = await run_in_threadpool(lambda: review.set_verdict(name, status=status, note=verdict.note))
    return asdict(record)


_MASK_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "mask": {
                            "type": "string",
                            "format": "binary",
                            "description": "The corrected mask: PNG (or any accepted format), 0/255, the image's size.",
                        },
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The original image; needed with the first mask, optional later.",
                        },
                    },
                    "required": ["mask"],
                }
            }
        },
    }
}


@router.put(
    "/reviews/{name}/mask",
    openapi_extra=_MASK_FORM,
    response_model=ReviewOut,
    responses=_responses(400, 401, 404, 409, 413, 415, 422, 500, 507),
)
async def put_mask(
    name: str,
    request: Request,
    store: ReviewStoreDep,
    service: ServiceDep,
    settings: SettingsDep,
    threshold: Annotated[
        float | None,
        Query(
            gt=0.0, lt=1.0, description="Threshold of the model's mask that Dice compares against; default the model's."
        ),
    ] = None,
) -> dict[str, Any]:
    """Save the reviewer's corrected mask: `images/<stem>.<ext>` (the original bytes) and
    `masks/<stem>.png` (single channel, 0/255) in the review folder, and the record's Dice of
    this mask against the model's mask at `threshold`."""
    review = _require(store)
    check_name(name)
    (mask_data, mask_name), image_upload = await _read_mask_form(request, settings)
    if image_upload is not None:
        image_data, image_name = image_upload
    else:
        stored = await run_in_threadpool(_stored_image, review, name)
        if stored is None:
            raise NoFile(f"{name}: send the image as multipart field 'file' with its first corrected mask")
        image_data, image_name = stored, name
    info = probe_image(image_data, image_name, settings.max_pixels)
    mask = await run_in_threadpool(decode_binary_mask, mask_data, mask_name, settings.max_pixels)
    if mask.shape != (info.height, info.width):
        raise MaskMismatch(
            f"{mask_name}: the mask is {mask.shape[1]}x{mask.shape[0]}, the image {info.width}x{info.height}"
        )
    used = service.threshold if threshold is None else threshold
    model_mask = await _model_mask(service, settings, image_data, image_name, used)
    record = await run_in_threadpool(
        lambda: review.save_correction(
            name,
            image=image_data if image_upload is not None else None,
            image_format=info.format,
            image_size=(info.height, info.width),
            mask=mask,
            model_mask=model_mask,
            threshold=used if model_mask is not None else None,
        )
    )
    return asdict(record)


@router.get(
    "/reviews/{name}/mask",
    responses={
        **_responses(400, 401, 404, 500),
        200: {"content": {"image/png": {}}, "description": "The corrected mask"},
    },
)
async def get_mask(name: str, store: ReviewStoreDep) -> FileResponse:
    """The saved corrected mask of one image (8-bit PNG, 0/255)."""
    path = _require(store).mask_path(name)
    return FileResponse(path, media_type="image/png")


def _require(store: ReviewStore | None) -> ReviewStore:
    if store is None:
        raise ApiError(404, "this server keeps no review records: start it with --review-dir DIR", "not_found")
    return store


def _stored_image(store: ReviewStore, name: str) -> bytes | None:
    try:
        path = store.image_path(name)
    except NotReviewed:  # no record yet: no stored image (an unreadable review.json is reported as such)
        return None
    return path.read_bytes() if path is not None else None


async def _model_mask(
    service: Any, settings: WebSettings, data: bytes, name: str, threshold: float
) -> np.ndarray | None:
    """The model's mask at ``threshold``, or ``None`` when the model is busy: the reviewer's mask
    is saved either way, only without its Dice."""
    try:
        _, prediction = await run_job(service, settings, "segment", data, name, threshold)
    except ServiceBusy:
        return None
    return np.asarray(prediction.mask, dtype=bool)


async def _read_mask_form(
    request: Request, settings: WebSettings
) -> tuple[tuple[bytes, str], tuple[bytes, str] | None]:
    """``((mask bytes, name), (image bytes, name) or None)`` from the multipart fields ``mask`` and ``file``."""
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith("multipart/form-data"):
        raise NotAnImage(f"content type '{content_type}' is not multipart/form-data; send fields 'mask' and 'file'")
    try:
        form = await request.form(max_files=2, max_fields=8)
    except UploadError:
        raise
    except Exception as error:  # noqa: BLE001 - malformed multipart framing: any parser error is the client's
        raise BadMultipart(f"cannot parse the multipart upload ({clean_reason(error)})") from None
    parts: dict[str, tuple[bytes, str] | None] = {}
    for field in ("mask", "file"):
        upload = form.get(field)
        if isinstance(upload, UploadFile):
            data = await upload.read(settings.max_upload_bytes + 1)
            await upload.close()
            label = upload.filename.rsplit("/", 1)[-1] if upload.filename else field
            check_size(data, label, settings.max_upload_bytes, upload.size)
            parts[field] = (data, label)
        else:
            parts[field] = None
    mask = parts["mask"]
    if mask is None:
        raise NoFile("no mask in the upload: send the corrected mask as multipart field 'mask'")
    return mask, parts["file"]
