"""Short video uploads: decode frame by frame, segment through the shared queue, per-frame stats."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from polypseg.inference.video import VideoError, VideoInfo

DEFAULT_MAX_FRAMES = 300


def segment_video_bytes(
    service: InferenceService,
    data: bytes,
    name: str,
    *,
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
    still = sniff_format(data)
    if still is not None:
        # FFmpeg opens a still image as a one-frame "video"; the client meant /v1/segment.
        raise NotAVideo(f"{name}: a {still} image, not a video; send images to /v1/segment")
    with _saved_upload(data, name) as tmp:
        info = _checked_video_info(tmp, name, max_pixels)
        started = time.perf_counter()
        source = _UploadFrames(tmp, max_frames)
        levels = ThresholdLevelTrack() if include_levels else None
        rows, masks = _segment_frames(
            service, source, threshold=threshold, timeout=timeout, include_masks=include_masks, levels=levels
        )
        warning = _decoding_warning(source.error, len(rows), tmp, name)
        if not rows:
            raise CorruptImage(f"{name}: the video has no frames")
        ious = [r["iou_with_previous"] for r in rows if r["iou_with_previous"] is not None]
        body: dict[str, Any] = {
            "name": name,
            "width": info.width,
            "height": info.height,
            "fps": round(info.fps, 3),
            "frames": len(rows),
            "frames_limited": source.limited,
            "threshold": float(service.threshold if threshold is None else threshold),
            "consistency": round(float(np.mean(ious)), 6) if ious else 1.0,
            "per_frame": rows,
            "seconds": round(time.perf_counter() - started, 4),
        }
        if source.limited:
            body["warning"] = f"only the first {max_frames} frames were segmented (the server's --max-video-frames)"
        if warning:
            body["warning"] = warning
        if include_masks:
            body["masks_rle"] = masks
        if levels is not None:
            body["threshold_levels"] = levels.body()
        return body


@contextmanager
def _saved_upload(data: bytes, name: str) -> Iterator[str]:
    """The upload in a temporary file with its name's suffix (FFmpeg guesses formats by it), removed afterwards."""
    suffix = Path(name).suffix if Path(name).suffix else ".bin"
    handle, tmp = tempfile.mkstemp(prefix="polypseg-upload-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        yield tmp
    finally:
        Path(tmp).unlink(missing_ok=True)


def _checked_video_info(tmp: str, name: str, max_pixels: int) -> VideoInfo:
    """The upload's size and frame rate; :class:`NotAVideo` when it cannot be opened, :class:`TooManyPixels`
    when its frames are over ``max_pixels``."""
    from polypseg.inference.video import VideoError, video_info

    try:
        info = video_info(tmp)
    except VideoError:
        raise NotAVideo(
            f"{name}: cannot be opened as a video (not a video, or truncated; MP4, WebM, AVI and MOV work)"
        ) from None
    if info.width * info.height > max_pixels:
        raise TooManyPixels(f"{name}: frames of {info.width}x{info.height} are over the limit of {max_pixels:,} pixels")
    return info


class _UploadFrames:
    """The first ``max_frames`` frames of a video file, as RGB arrays; iterating notes each frame's time in
    ``times``, sets ``limited`` when frames were left out and keeps a decoding error in ``error``."""

    def __init__(self, path: str, max_frames: int) -> None:
        self.path = path
        self.max_frames = max_frames
        self.times: list[float] = []
        self.limited = False
        self.error: VideoError | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        from polypseg.inference.video import VideoError, read_frames

        # A decoding error ends the stream here, not inside segment_stream: the frames already
        # decoded but not yet sent as a batch are still segmented.
        try:
            for index, seconds, frame in read_frames(self.path):
                if index >= self.max_frames:
                    self.limited = True
                    return
                self.times.append(seconds)
                yield frame
        except VideoError as error:
            self.error = error


def _segment_frames(
    service: InferenceService,
    source: _UploadFrames,
    *,
    threshold: float | None,
    timeout: float,
    include_masks: bool,
    levels: ThresholdLevelTrack | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per frame (area, confidence, IoU with the previous frame's mask) and, with ``include_masks``,
    each mask as COCO RLE; each frame's probabilities go into ``levels`` when given. A :class:`VideoError`
    raised while segmenting is kept in ``source.error``."""
    from polypseg.inference.video import VideoError, mask_iou

    rows: list[dict[str, Any]] = []
    masks: list[dict[str, Any]] = []
    previous: np.ndarray | None = None
    try:
        for index, prediction in enumerate(service.segment_stream(iter(source), threshold, timeout)):
            iou = None if previous is None else mask_iou(prediction.mask, previous)
            previous = prediction.mask
            rows.append(
                {
                    "frame": index,
                    "time_s": round(source.times[index], 4),
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
        source.error = error
    return rows, masks


def _decoding_warning(error: VideoError | None, frames: int, tmp: str, name: str) -> str | None:
    """The warning for a video whose decoding stopped after ``frames`` frames (None when it did not stop
    early); :class:`CorruptImage` when not one frame was decoded. The temporary file's path is left out."""
    if error is None:
        return None
    reason = clean_reason(str(error).replace(tmp, ""), name)
    if not frames:
        raise CorruptImage(f"{name}: no frame could be decoded" + (f" ({reason})" if reason else "")) from None
    return f"decoding stopped after {frames} frames" + (f" ({reason})" if reason else "")
