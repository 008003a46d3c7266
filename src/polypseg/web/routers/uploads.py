"""Reading an upload from a request and running it through the service's queue (used by the inference routes)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from polypseg.web.service import InferenceService, ServiceBusy
from polypseg.web.settings import WebSettings
from polypseg.web.validation import (
    BadMultipart,
    NoFile,
    NotAnImage,
    NotAVideo,
    UploadError,
    check_size,
    clean_reason,
    decode_image_bytes,
    probe_image,
)

Upload = tuple[bytes, str]


async def read_upload(
    request: Request, settings: WebSettings, media: str = "image", with_mask: bool = False
) -> tuple[bytes, str, Upload | None]:
    """``(data, name, mask)``: the upload, its file name, and (``with_mask``) the optional
    multipart field ``mask`` as ``(data, name)``.

    The upload is the multipart field ``file`` (or the first file field) or the raw request body.
    """
    content_type = request.headers.get("content-type", "").lower()
    mask = None
    article = "an" if media[0] in "aeiou" else "a"
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=2 if with_mask else 1, max_fields=16)
        except UploadError:
            raise
        except Exception as error:  # noqa: BLE001 - malformed multipart framing: any parser error is the client's
            raise BadMultipart(f"cannot parse the multipart upload ({clean_reason(error)})") from None
        if not list(form.multi_items()):
            # A well-formed multipart body has at least one part; none means broken framing
            # (e.g. a missing closing boundary), which the parser reports as an empty form.
            raise BadMultipart("cannot parse the multipart upload: no complete part (is the closing boundary missing?)")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            uploads = [v for k, v in form.multi_items() if isinstance(v, UploadFile) and k != "mask"]
            if not uploads:
                raise NoFile(f"no file in the upload: send the {media} as multipart field 'file'")
            upload = uploads[0]
        name = Path(upload.filename or "upload").name
        data = await upload.read(settings.max_upload_bytes + 1)
        size = upload.size
        await upload.close()
        given_mask = form.get("mask") if with_mask else None
        if isinstance(given_mask, UploadFile):
            mask_name = Path(given_mask.filename or "mask").name
            mask_data = await given_mask.read(settings.max_upload_bytes + 1)
            await given_mask.close()
            check_size(mask_data, mask_name, settings.max_upload_bytes, given_mask.size)
            mask = (mask_data, mask_name)
    elif content_type.startswith((f"{media}/", "application/octet-stream")) or not content_type:
        name = "request body"
        data = await request.body()
        size = len(data)
    else:
        refusal = NotAVideo if media == "video" else NotAnImage
        raise refusal(
            f"content type '{content_type}' is not {article} {media}; send {media} bytes or multipart field 'file'"
        )
    check_size(data, name, settings.max_upload_bytes, size)
    return data, name, mask


async def run_job(
    service: InferenceService,
    settings: WebSettings,
    kind: str,
    data: bytes,
    name: str,
    threshold: float | None,
    fold: int | None = None,
) -> tuple[np.ndarray, Any]:
    """Decode the image, queue it on ``service`` as one ``kind`` job and wait for the answer:
    ``(image, result)``. A full queue or no answer within the request timeout is :class:`ServiceBusy`."""
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
