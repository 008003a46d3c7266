"""``POST /v1/segment``, ``/v1/explain`` and ``/v1/segment-video``: the model's answers."""

from __future__ import annotations

import base64
import copy
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from polypseg.web import encoding
from polypseg.web.api_errors import ApiError
from polypseg.web.dependencies import TOKEN_REQUIRED, ServiceDep, SettingsDep
from polypseg.web.routers.uploads import read_upload, run_job
from polypseg.web.schemas import ERROR_RESPONSES, ErrorBody, ExplainResult, SegmentResult
from polypseg.web.validation import MaskMismatch, decode_mask_bytes
from polypseg.web.video_jobs import segment_video_bytes

COLORMAPS = ("viridis", "cividis", "magma", "jet")

_BINARY = {"type": "string", "format": "binary"}
_MULTIPART_FILE = {"schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]}}
_MASK_FIELD = {
    **_BINARY,
    "description": "Optional ground-truth mask of the same size (> 127 = polyp): the answer adds dice and iou.",
}
_MULTIPART_FILE_AND_MASK = {
    "schema": {"type": "object", "properties": {"file": _BINARY, "mask": _MASK_FIELD}, "required": ["file"]}
}


def _request_body(multipart: dict[str, Any], raw_media: str) -> dict[str, Any]:
    """OpenAPI ``requestBody``: a multipart form, or the raw bytes as ``raw_media``."""
    content = {"multipart/form-data": multipart, raw_media: {"schema": _BINARY}}
    return copy.deepcopy({"requestBody": {"required": True, "content": content}})


Threshold = Annotated[
    float | None,
    Query(gt=0.0, lt=1.0, description="Decision threshold; default: the model's (chosen in training)."),
]

router = APIRouter(prefix="/v1", tags=["inference"], dependencies=TOKEN_REQUIRED)


@router.post(
    "/segment",
    openapi_extra=_request_body(_MULTIPART_FILE_AND_MASK, "image/*"),
    response_model=SegmentResult,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
)
async def segment(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    threshold: Threshold = None,
    mask_format: Annotated[
        Literal["png", "rle"],
        Query(description="png: 8-bit PNG (0/255), base64. rle: COCO uncompressed RLE, column-major."),
    ] = "png",
    include_probability: Annotated[
        bool, Query(description="Add the probability map (see probability_format).")
    ] = False,
    probability_format: Annotated[
        Literal["png", "float32"],
        Query(
            description=(
                "png: 8-bit PNG of round(p*255), base64 (probability_png_base64). float32: the exact "
                "probabilities, row-major little-endian float32, base64 (probability_f32_base64); "
                "p >= threshold (in float32) is exactly the served mask."
            )
        ),
    ] = "png",
    include_image: Annotated[bool, Query(description="Add the decoded input image as JPEG (for display).")] = False,
) -> dict[str, Any]:
    """Segment one image: mask, polyp area and mean confidence; Dice and IoU against an optional ground-truth `mask`."""
    started = time.perf_counter()
    data, name, mask_upload = await read_upload(request, settings, with_mask=True)
    image, prediction = await run_job(service, settings, "segment", data, name, threshold)
    body = await run_in_threadpool(
        segment_body, image, prediction, mask_format, include_probability, include_image, probability_format
    )
    if mask_upload is not None:
        mask_data, mask_name = mask_upload
        truth = await run_in_threadpool(decode_mask_bytes, mask_data, mask_name, settings.max_pixels)
        if truth.shape != image.shape[:2]:
            raise MaskMismatch(
                f"{mask_name}: the mask is {truth.shape[1]}x{truth.shape[0]}, "
                f"the image {image.shape[1]}x{image.shape[0]}"
            )
        body.update(overlap(np.asarray(prediction.mask, dtype=bool), truth), mask_name=mask_name)
    body.update(name=name, n_models=service.n_models, seconds=round(time.perf_counter() - started, 4))
    return body


@router.post(
    "/explain",
    openapi_extra=_request_body(_MULTIPART_FILE, "image/*"),
    response_model=ExplainResult,
    response_model_exclude_none=True,
    responses={**ERROR_RESPONSES, 501: {"model": ErrorBody, "description": "Serving an ONNX model: no Grad-CAM"}},
)
async def explain(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    threshold: Threshold = None,
    include_overlay: Annotated[bool, Query(description="Add the heatmap blended 50 % over the image, PNG.")] = True,
    heatmap_bits: Annotated[int, Query(description="Bit depth of the grayscale heatmap PNG: 8 or 16.")] = 8,
    colormap: Annotated[
        Literal[COLORMAPS],  # type: ignore[valid-type]
        Query(
            description=(
                "Colours of the overlay: viridis, cividis, magma (perceptually uniform, colour-blind safe) or jet."
            )
        ),
    ] = "viridis",
    fold: Annotated[
        int | None,
        Query(ge=0, description="Explain one fold's model only (0-based); default: every model, heatmaps averaged."),
    ] = None,
) -> dict[str, Any]:
    """Grad-CAM of the served mask (final decoder block).

    The target is each model's logits summed inside the mask `/v1/segment` answers at the same
    threshold (for a CV run: the ensemble's mask); the heatmaps of the ensemble's models are averaged.
    """
    started = time.perf_counter()
    if heatmap_bits not in (8, 16):
        raise ApiError(422, f"invalid heatmap_bits: {heatmap_bits} (use 8 or 16)", "invalid_parameter")
    service.check_explain(fold)
    data, name, _ = await read_upload(request, settings)
    used = service.threshold if threshold is None else threshold
    image, result = await run_job(service, settings, "explain", data, name, used, fold)
    body = await run_in_threadpool(explain_body, image, result, include_overlay, heatmap_bits, colormap, used)
    explained = list(result.models)
    ensemble_note = ", the ensemble's mean probability" if service.n_models > 1 else ""
    body.update(
        name=name,
        threshold=used,
        layer=service.explain_layer,
        method="gradcam",
        target=f"sum of logits inside the served mask (probability >= threshold{ensemble_note})",
        models=explained,
        model_index=explained[0] if len(explained) == 1 else None,
        combine="mean of the per-model heatmaps" if len(explained) > 1 else None,
        colormap=colormap if include_overlay else None,
        seconds=round(time.perf_counter() - started, 4),
    )
    return body


@router.post(
    "/segment-video",
    openapi_extra=_request_body(_MULTIPART_FILE, "video/*"),
    responses=ERROR_RESPONSES,
)
async def segment_video(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    threshold: Threshold = None,
    include_masks: Annotated[bool, Query(description="Add each frame's mask as COCO RLE (column-major).")] = False,
    include_levels: Annotated[
        bool,
        Query(
            description=(
                "Add threshold_levels, to re-threshold without the model at t = 0.01 ... 0.99: per frame an "
                "8-bit PNG (base64) whose pixel value is how many of those t the probability reaches "
                "(p >= t in float32; the mask at k/100 is value >= k), and the area, mean confidence and IoU "
                "with the previous frame at each t."
            )
        ),
    ] = False,
) -> dict[str, Any]:
    """Segment a short video frame by frame: per-frame polyp area, confidence and IoU with the previous frame.

    Frames share the queue with image requests; only the first ``--max-video-frames`` frames are used.
    """
    data, name, _ = await read_upload(request, settings, media="video")
    return await run_in_threadpool(
        segment_video_bytes,
        service,
        data,
        name,
        threshold=threshold,
        max_frames=settings.max_video_frames,
        max_pixels=settings.max_pixels,
        include_masks=include_masks,
        timeout=settings.request_timeout,
        include_levels=include_levels,
    )


def segment_body(
    image: np.ndarray,
    prediction: Any,
    mask_format: str,
    include_probability: bool,
    include_image: bool,
    probability_format: str = "png",
) -> dict[str, Any]:
    """The image part of a ``/v1/segment`` answer: size, threshold, area, confidence and the encoded mask."""
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
    if include_probability and probability_format == "float32":
        exact = np.ascontiguousarray(prediction.probability, dtype="<f4")
        body["probability_f32_base64"] = base64.b64encode(exact.tobytes()).decode("ascii")
    elif include_probability:
        body["probability_png_base64"] = encoding.png_base64(encoding.unit_to_uint8(prediction.probability))
    uncertainty = getattr(prediction, "uncertainty", None)
    if uncertainty is not None:
        # Std of the fold probabilities is at most 0.5: PNG value = round(min(2 * std, 1) * 255).
        spread = np.clip(2.0 * uncertainty, 0, 1)
        body["uncertainty_png_base64"] = encoding.png_base64(encoding.unit_to_uint8(spread))
        body["mean_uncertainty"] = float(np.mean(uncertainty))
    if include_image:
        body["image_jpeg_base64"] = encoding.jpeg_base64(image)
    return body


def explain_body(
    image: np.ndarray,
    result: Any,
    include_overlay: bool,
    heatmap_bits: int,
    colormap: str = "viridis",
    threshold: float = 0.5,
) -> dict[str, Any]:
    """The image part of a ``/v1/explain`` answer: the heatmap PNG, its maximum, the mask area and the overlay."""
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


def overlap(prediction: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Dice and IoU of two boolean masks; both 1.0 when both are empty."""
    inter = int(np.count_nonzero(prediction & truth))
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(truth))
    union = total - inter
    return {
        "dice": 1.0 if total == 0 else 2.0 * inter / total,
        "iou": 1.0 if union == 0 else inter / union,
        "truth_area_pixels": int(np.count_nonzero(truth)),
    }
