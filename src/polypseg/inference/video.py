"""Video segmentation: read with PyAV, predict frame by frame, write an overlay video and a CSV.

Temporal smoothing is an exponential moving average of the probability maps,
``s_t = alpha * p_t + (1 - alpha) * s_(t-1)`` (``alpha = 1``: none). Frame-to-frame consistency is
the mean IoU between consecutive masks (two empty masks count as 1). Both the raw and the smoothed
masks come from the same model pass, so the two consistency figures are directly comparable.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from polypseg.data.inputs import VIDEO_EXTENSIONS, is_video, write_csv  # noqa: F401 - the first two stay importable from here
from polypseg.errors import PolypsegError

FRAME_COLUMNS = ("frame", "time_s", "area_fraction", "mean_confidence", "iou_with_previous")

log = logging.getLogger(__name__)


class VideoError(PolypsegError):
    """A video cannot be opened, decoded or written; the message names the file."""


@dataclass
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: float
    frames: int  # 0 when the container does not say


@dataclass
class VideoResult:
    """What :func:`segment_video` did; consistency figures are mean IoU of consecutive masks."""

    source: Path
    frames: int
    fps: float
    consistency: float  # raw masks
    consistency_smoothed: float | None  # with EMA smoothing; None without it
    alpha: float | None
    overlay: Path | None = None
    frames_csv: Path | None = None
    codec: str | None = None
    seconds: float = 0.0
    warning: str | None = None  # decoding stopped early (damaged file); frames up to there are kept


def _open(path: Path) -> Any:
    import av

    if not path.is_file():
        raise VideoError(f"video not found: {path}")
    try:
        container = av.open(str(path))
    except Exception as error:  # noqa: BLE001 - PyAV/FFmpeg errors of every kind mean "unreadable"
        raise VideoError(f"cannot open video {path}: {str(error).splitlines()[0] or type(error).__name__}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path} has no video stream")
    return container


def video_info(path: Path | str) -> VideoInfo:
    """Size, frame rate and (if known) frame count of a video."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or 25
        return VideoInfo(
            path, stream.codec_context.width, stream.codec_context.height, float(rate), int(stream.frames or 0)
        )
    finally:
        container.close()


def read_frames(path: Path | str) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(index, time_s, uint8 RGB (H, W, 3))`` for each frame.

    A decoding error part-way logs a warning and ends the iteration (frames before it are kept).
    """
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        index = 0
        decoded = container.decode(stream)
        while True:
            try:
                frame = next(decoded)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - a damaged packet: keep what we have
                raise _DecodeStopped(
                    f"{path}: decoding stopped after {index} frames ({str(error).splitlines()[0]})"
                ) from None
            seconds = float(frame.time) if frame.time is not None else index / fps
            yield index, seconds, frame.to_ndarray(format="rgb24")
            index += 1
    finally:
        container.close()


class _DecodeStopped(VideoError):
    pass


class VideoWriter:
    """H.264 (libx264) MP4 writer, MPEG-4 Part 2 where this PyAV build lacks libx264.

    Frames go to a temporary file beside ``path``, renamed onto it by :meth:`close`, so an
    interrupted run never leaves a truncated video under the final name.
    """

    def __init__(self, path: Path | str, fps: float) -> None:
        import av

        self.path = Path(path)
        self.fps = fps
        self.codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(handle)
        self._tmp = Path(tmp)
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        self._stream: Any = None
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        # yuv420p needs even sizes: replicate the last row/column where needed.
        pad = ((0, rgb.shape[0] % 2), (0, rgb.shape[1] % 2), (0, 0))
        if pad[0][1] or pad[1][1]:
            rgb = np.pad(rgb, pad, mode="edge")
        if self._stream is None:
            self._stream = self._container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.width, self._stream.height = rgb.shape[1], rgb.shape[0]
            self._stream.pix_fmt = "yuv420p"
            if self.codec == "libx264":
                self._stream.options = {"crf": "20", "preset": "veryfast"}
            else:
                self._stream.bit_rate = 8_000_000
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self, keep: bool = True) -> None:
        finished = False
        try:
            if self._stream is not None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
            self._container.close()
            finished = True
        finally:
            if keep and finished and self.frames:  # a flush or close that failed leaves no video
                from polypseg.core.io_utils import default_file_mode

                os.chmod(self._tmp, default_file_mode())  # mkstemp made it owner-only, unlike other outputs
                os.replace(self._tmp, self.path)
            else:
                self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(keep=exc_type is None)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty (the metrics module's convention)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


class ExponentialSmoother:
    """EMA of probability maps: ``s_0 = p_0``, ``s_t = alpha * p_t + (1 - alpha) * s_(t-1)``."""

    def __init__(self, alpha: float) -> None:
        if not 0 < alpha <= 1:
            raise VideoError(f"--smooth {alpha}: alpha must be in (0, 1]")
        self.alpha = alpha
        self._state: np.ndarray | None = None

    def __call__(self, probability: np.ndarray) -> np.ndarray:
        if self._state is None or self._state.shape != probability.shape:
            self._state = probability.astype(np.float32, copy=True)
        else:
            self._state = (self.alpha * probability + (1 - self.alpha) * self._state).astype(np.float32)
        return self._state


class _Consistency:
    """Running IoU between consecutive masks."""

    def __init__(self) -> None:
        self._previous: np.ndarray | None = None
        self.ious: list[float] = []

    def update(self, mask: np.ndarray) -> float | None:
        iou = None if self._previous is None else mask_iou(mask, self._previous)
        self._previous = mask
        if iou is not None:
            self.ious.append(iou)
        return iou

    @property
    def mean(self) -> float:
        return float(np.mean(self.ious)) if self.ious else 1.0


def _cell(value: float | None) -> float | str:
    return "" if value is None else round(value, 6)


def segment_video(
    predictor: Any,
    path: Path | str,
    out_dir: Path | str | None = None,
    *,
    alpha: float | None = None,
    stem: str | None = None,
    write_overlay: bool = True,
    progress: bool = True,
) -> VideoResult:
    """Segment every frame of a video with a :class:`polypseg.inference.predictor.Predictor`.

    Writes ``<stem>_overlay.mp4`` and ``<stem>_frames.csv`` (columns :data:`FRAME_COLUMNS`, plus
    ``iou_with_previous_raw`` when smoothing) into ``out_dir`` when given. With ``alpha`` in
    (0, 1), the EMA-smoothed probabilities give the masks, overlay and CSV figures.
    """
    path = Path(path)
    smoother = ExponentialSmoother(alpha) if alpha is not None else None
    if smoother is not None and smoother.alpha == 1:
        smoother = None  # alpha 1 keeps only the newest frame: no smoothing
    info = video_info(path)
    stem = stem or path.stem
    out = Path(out_dir) if out_dir is not None else None
    writer = VideoWriter(out / f"{stem}_overlay.mp4", info.fps) if out is not None and write_overlay else None
    segmenter = _FrameSegmenter(predictor, smoother, writer)
    started = time.perf_counter()
    with writer if writer is not None else nullcontext():  # an interrupted run leaves no overlay
        warning = _feed_frames(path, segmenter, batch_size=predictor.batch_size, total=info.frames, progress=progress)
    if not segmenter.rows:
        raise VideoError(f"{path}: no frame could be decoded")

    frames_csv = None
    if out is not None:
        frames_csv = out / f"{stem}_frames.csv"
        write_csv(frames_csv, segmenter.columns, segmenter.rows)
    return VideoResult(
        source=path,
        frames=len(segmenter.rows),
        fps=info.fps,
        consistency=segmenter.raw.mean,
        consistency_smoothed=segmenter.smoothed.mean if smoother is not None else None,
        alpha=smoother.alpha if smoother is not None else None,
        overlay=writer.path if writer is not None and writer.frames else None,
        frames_csv=frames_csv,
        codec=writer.codec if writer is not None else None,
        seconds=time.perf_counter() - started,
        warning=warning,
    )


class _FrameSegmenter:
    """Segments batches of ``(index, time_s, frame)``: one CSV row per frame, each frame's overlay written,
    the consistency of the raw and (with a smoother) the smoothed masks followed."""

    def __init__(self, predictor: Any, smoother: ExponentialSmoother | None, writer: VideoWriter | None) -> None:
        self.predictor = predictor
        self.smoother = smoother
        self.writer = writer
        self.rows: list[dict[str, Any]] = []
        self.raw, self.smoothed = _Consistency(), _Consistency()

    @property
    def columns(self) -> list[str]:
        """The frames CSV's columns: :data:`FRAME_COLUMNS`, plus the raw masks' IoU when smoothing."""
        return list(FRAME_COLUMNS) + (["iou_with_previous_raw"] if self.smoother is not None else [])

    def __call__(self, batch: list[tuple[int, float, np.ndarray]]) -> None:
        from polypseg.inference.masks import overlay_mask
        from polypseg.inference.predictor import Prediction

        predictions = self.predictor.predict([frame for _, _, frame in batch])
        for (index, seconds, frame), prediction in zip(batch, predictions, strict=False):
            iou_raw = self.raw.update(prediction.mask)
            shown, iou = prediction, iou_raw
            if self.smoother is not None:
                shown = Prediction(
                    self.smoother(prediction.probability),
                    prediction.threshold,
                    prediction.uncertainty,
                    prediction.source,
                )
                iou = self.smoothed.update(shown.mask)
            row = {
                "frame": index,
                "time_s": round(seconds, 4),
                "area_fraction": round(shown.area_fraction, 6),
                "mean_confidence": round(shown.mean_confidence, 6),
                "iou_with_previous": _cell(iou),
            }
            if self.smoother is not None:
                row["iou_with_previous_raw"] = _cell(iou_raw)
            self.rows.append(row)
            if self.writer is not None:
                self.writer.write(overlay_mask(frame, shown.mask))


def _feed_frames(
    path: Path,
    segment: Callable[[list[tuple[int, float, np.ndarray]]], None],
    *,
    batch_size: int,
    total: int,
    progress: bool,
) -> str | None:
    """Pass the video's frames to ``segment`` in batches of ``batch_size``, under a progress bar when asked;
    returns the warning when decoding stopped early (the frames before it are segmented)."""
    warning = None
    with _frame_progress(path.name, total, enabled=progress) as advance:
        batch: list[tuple[int, float, np.ndarray]] = []
        try:
            for item in read_frames(path):
                batch.append(item)
                if len(batch) == batch_size:
                    segment(batch)
                    advance(len(batch))
                    batch = []
        except _DecodeStopped as stopped:
            warning = str(stopped)
        if batch:
            segment(batch)
    return warning


@contextmanager
def _frame_progress(name: str, total: int, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """``advance(frames)`` for a transient progress bar on stderr (``total`` 0: unknown); a no-op when not ``enabled``."""
    if not enabled:
        yield lambda frames: None
        return
    from rich.console import Console
    from rich.progress import Progress

    bar = Progress(console=Console(stderr=True), transient=True)
    bar.start()
    try:
        task = bar.add_task(name, total=total or None)
        yield lambda frames: bar.advance(task, frames)
    finally:
        bar.stop()
