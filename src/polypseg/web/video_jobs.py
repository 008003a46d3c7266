"""Short video uploads: decode frame by frame, segment through the shared queue, per-frame stats."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from polypseg.web import encoding
from polypseg.web.service import InferenceService
from polypseg.web.threshold_levels import ThresholdLevelTrack
from polypseg.web.validation import (
    CorruptImage,
    NotAVideo,
    TooManyPixels,
    UploadError,
    clean_reason,
    sniff_format,
)

DEFAULT_MAX_FRAMES = 300


def segment_video_bytes(
    service: InferenceService,
    data: bytes,
    name: str,
    threshold: float | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_pixels: int = 40_000_000,
    include_masks: bool = False,
    timeout: float = 120.0,
    include_levels: bool = False,
) -> dict[str, Any]:
    """Segment up to ``max_frames`` frames of an uploaded video (blocking; run it in a thread).

    Returns per-frame area, confidence and IoU with the previous frame's mask, the mean of those
    IoUs (temporal consistency) and, with ``include_masks``, each frame's mask as COCO RLE; with
    ``include_levels``, what re-thresholds the video without the model (:mod:`polypseg.web.threshold_levels`).
    """
    from polypseg.inference.video import VideoError, mask_iou, read_frames, video_info

    still = sniff_format(data)
    if still is not None:
        # FFmpeg opens a still image as a one-frame "video"; the client meant /v1/segment.
        raise NotAVideo(f"{name}: a {still} image, not a video; send images to /v1/segment")
    suffix = Path(name).suffix if Path(name).suffix else ".bin"
    handle, tmp = tempfile.mkstemp(prefix="polypseg-upload-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        try:
            info = video_info(tmp)
        except VideoError:
            raise NotAVideo(
                f"{name}: cannot be opened as a video (not a video, or truncated; MP4, WebM, AVI and MOV work)"
            ) from None
        if info.width * info.height > max_pixels:
            raise TooManyPixels(
                f"{name}: frames of {info.width}x{info.height} are over the limit of {max_pixels:,} pixels"
            )
        started = time.perf_counter()
        rows: list[dict[str, Any]] = []
        masks: list[dict[str, Any]] = []
        times: list[float] = []
        previous: np.ndarray | None = None
        levels = ThresholdLevelTrack() if include_levels else None
        warning = None
        limited = False

        decode_error: VideoError | None = None

        def frames():
            # A decoding error ends the stream here, not inside segment_stream: the frames already
            # decoded but not yet sent as a batch are still segmented.
            nonlocal limited, decode_error
            try:
                for index, seconds, frame in read_frames(tmp):
                    if index >= max_frames:
                        limited = True
                        return
                    times.append(seconds)
                    yield frame
            except VideoError as error:
                decode_error = error

        try:
            for index, prediction in enumerate(service.segment_stream(frames(), threshold, timeout)):
                iou = None if previous is None else mask_iou(prediction.mask, previous)
                previous = prediction.mask
                rows.append(
                    {
                        "frame": index,
                        "time_s": round(times[index], 4),
                        "area_pixels": prediction.area_pixels,
                        "area_fraction": round(prediction.area_fraction, 6),
                        "mean_confidence": round(prediction.mean_confidence, 6),
                        "iou_with_previous": None if iou is None else round(iou, 6),
                    }
                )
                if include_masks:
                    masks.append(encoding.rle_encode(prediction.mask))
                if levels is not None:
                    levels.add(prediction.probability)
        except UploadError:
            raise
        except VideoError as error:  # raised outside decoding (e.g. by the stream itself)
            decode_error = error
        if decode_error is not None:
            reason = clean_reason(str(decode_error).replace(str(tmp), ""), name)
            if not rows:
                raise CorruptImage(f"{name}: no frame could be decoded" + (f" ({reason})" if reason else "")) from None
            warning = f"decoding stopped after {len(rows)} frames" + (f" ({reason})" if reason else "")
        if not rows:
            raise CorruptImage(f"{name}: the video has no frames")
        ious = [r["iou_with_previous"] for r in rows if r["iou_with_previous"] is not None]
        body: dict[str, Any] = {
            "name": name,
            "width": info.width,
            "height": info.height,
            "fps": round(info.fps, 3),
            "frames": len(rows),
            "frames_limited": limited,
            "threshold": float(service.threshold if threshold is None else threshold),
            "consistency": round(float(np.mean(ious)), 6) if ious else 1.0,
            "per_frame": rows,
            "seconds": round(time.perf_counter() - started, 4),
        }
        if limited:
            body["warning"] = f"only the first {max_frames} frames were segmented (the server's --max-video-frames)"
        if warning:
            body["warning"] = warning
        if include_masks:
            body["masks_rle"] = masks
        if levels is not None:
            body["threshold_levels"] = levels.body()
        return body
    finally:
        Path(tmp).unlink(missing_ok=True)
