"""Video: PyAV round trip, per-frame CSV, overlay video, EMA smoothing and consistency."""

from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch import nn

from polypseg.inference.predictor import Predictor
from polypseg.inference.video import (
    ExponentialSmoother,
    VideoError,
    VideoWriter,
    mask_iou,
    read_frames,
    segment_video,
    video_info,
)


class _BrightModel(nn.Module):
    """Segments bright pixels: the logit is a scaled mean of the normalised channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * x.mean(1, keepdim=True)


def _square_frames(n: int = 8, size: int = 64, present: list[bool] | None = None) -> list[np.ndarray]:
    frames = []
    for i in range(n):
        frame = np.full((size, size, 3), 30, np.uint8)
        if present is None or present[i]:
            x = 8 + 3 * i  # moves right by 3 px per frame
            frame[20:40, x : x + 20] = 240
        frames.append(frame)
    return frames


def _write_video(path: Path, frames: list[np.ndarray], fps: int = 10, codec: str = "mpeg4") -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture()
def predictor() -> Predictor:
    return Predictor.from_model(_BrightModel(), image_size=32, device="cpu", batch_size=3)


def test_read_frames_round_trip(tmp_path: Path) -> None:
    frames = _square_frames()
    path = _write_video(tmp_path / "clip.avi", frames)
    info = video_info(path)
    assert (info.width, info.height) == (64, 64) and info.fps == pytest.approx(10)
    decoded = list(read_frames(path))
    assert [index for index, _, _ in decoded] == list(range(8))
    assert [t for _, t, _ in decoded] == pytest.approx([i / 10 for i in range(8)], abs=1e-3)
    for (_, _, frame), original in zip(decoded, frames, strict=False):
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
        assert np.abs(frame.astype(int) - original).mean() < 8  # lossy codec, same picture


def test_segment_video_writes_overlay_and_frame_csv(tmp_path: Path, predictor: Predictor) -> None:
    path = _write_video(tmp_path / "moving.mp4", _square_frames())
    result = segment_video(predictor, path, tmp_path / "out", progress=False)
    assert result.frames == 8 and result.consistency_smoothed is None
    with open(result.frames_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["frame", "time_s", "area_fraction", "mean_confidence", "iou_with_previous"]
    assert [int(r["frame"]) for r in rows] == list(range(8)) and rows[0]["iou_with_previous"] == ""
    areas = [float(r["area_fraction"]) for r in rows]
    assert areas == pytest.approx([400 / 4096] * 8, abs=0.03)  # the 20x20 square
    assert all(float(r["mean_confidence"]) > 0.9 for r in rows)
    # A 20 px square moving 3 px: IoU 17/23 between consecutive frames.
    ious = [float(r["iou_with_previous"]) for r in rows[1:]]
    assert ious == pytest.approx([17 / 23] * 7, abs=0.08)
    assert result.consistency == pytest.approx(np.mean(ious), abs=1e-5)
    overlay = list(read_frames(result.overlay))
    assert result.overlay.name == "moving_overlay.mp4" and len(overlay) == 8
    assert overlay[0][2].shape == (64, 64, 3)
    assert overlay[0][2][30, 18, 1] > overlay[0][2][30, 18, 0] + 40  # tinted green inside the square


def test_smoothing_raises_consistency_of_a_flickering_mask(tmp_path: Path, predictor: Predictor) -> None:
    flicker = [True, True, False, True, True, False, True, True]
    path = _write_video(tmp_path / "flicker.mp4", _square_frames(present=flicker))
    result = segment_video(predictor, path, tmp_path / "out", alpha=0.3, progress=False)
    assert result.alpha == 0.3 and result.consistency_smoothed is not None
    assert result.consistency < 0.7  # the mask vanishes twice
    assert result.consistency_smoothed > result.consistency + 0.1
    with open(result.frames_csv) as handle:
        rows = list(csv.DictReader(handle))
    raw = [float(r["iou_with_previous_raw"]) for r in rows[1:]]
    assert result.consistency == pytest.approx(np.mean(raw), abs=1e-5)
    assert result.consistency_smoothed == pytest.approx(
        np.mean([float(r["iou_with_previous"]) for r in rows[1:]]), abs=1e-5
    )
    # no output folder: figures only
    assert segment_video(predictor, path, None, alpha=1.0, progress=False).consistency == pytest.approx(
        result.consistency
    )


def test_a_run_that_fails_leaves_no_overlay_and_a_damaged_file_keeps_its_frames(
    tmp_path: Path, predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polypseg.inference.video as video

    path = _write_video(tmp_path / "clip.mp4", _square_frames())
    real_predict = predictor.predict
    calls = []

    def fails_on_the_second_batch(frames):
        calls.append(len(frames))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_predict(frames)

    monkeypatch.setattr(predictor, "predict", fails_on_the_second_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        segment_video(predictor, path, tmp_path / "failed", progress=False)
    assert not list((tmp_path / "failed").iterdir())  # neither the overlay nor its temporary file
    monkeypatch.setattr(predictor, "predict", real_predict)

    real_read = video.read_frames

    def damaged(source):
        for index, seconds, frame in real_read(source):
            if index == 5:  # part-way through the second batch of 3
                raise video._DecodeStopped(f"{source}: decoding stopped after 5 frames (invalid data)")
            yield index, seconds, frame

    monkeypatch.setattr(video, "read_frames", damaged)
    result = segment_video(predictor, path, tmp_path / "out", progress=True)
    assert result.frames == 5 and result.warning.endswith("decoding stopped after 5 frames (invalid data)")
    assert len(list(read_frames(result.overlay))) == 5


def test_writer_pads_odd_sizes(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "odd.mp4", fps=12.5) as writer:
        for frame in _square_frames(3, size=45):
            writer.write(frame[:, :44])
    frames = list(read_frames(tmp_path / "odd.mp4"))
    assert len(frames) == 3 and frames[0][2].shape == (46, 44, 3)
    assert not list(tmp_path.glob(".*.tmp"))  # temporary file renamed away
    from polypseg.core.io_utils import default_file_mode

    assert (tmp_path / "odd.mp4").stat().st_mode & 0o777 == default_file_mode()  # not mkstemp's 0600


def test_a_writer_whose_close_fails_leaves_no_video(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "out.mp4", fps=10)
    for frame in _square_frames(2, size=32):
        writer.write(frame)

    class DiskFullOnClose:
        def __init__(self, real) -> None:
            self.real = real

        def mux(self, packet) -> None:
            self.real.mux(packet)

        def close(self) -> None:
            self.real.close()
            raise OSError(28, "No space left on device")

    writer._container = DiskFullOnClose(writer._container)
    with pytest.raises(OSError, match="No space"):
        writer.close()
    assert not (tmp_path / "out.mp4").exists() and not list(tmp_path.glob(".*.tmp"))


def test_unreadable_video_is_named(tmp_path: Path, predictor: Predictor) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage" * 10)
    with pytest.raises(VideoError, match="broken.mp4"):
        segment_video(predictor, bad, tmp_path / "out", progress=False)
    with pytest.raises(VideoError, match="alpha"):
        segment_video(predictor, bad, tmp_path / "out", alpha=1.5, progress=False)


def test_mask_iou_conventions() -> None:
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), bool)
    half = np.zeros((4, 4), bool)
    half[:2] = True
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(empty, full) == 0.0
    assert mask_iou(half, full) == 0.5


def test_exponential_smoother() -> None:
    smoother = ExponentialSmoother(0.25)
    first = smoother(np.full((2, 2), 0.8, np.float32))
    assert np.allclose(first, 0.8)
    second = smoother(np.zeros((2, 2), np.float32))
    assert np.allclose(second, 0.25 * 0 + 0.75 * 0.8)
    assert np.allclose(smoother(np.ones((2, 2), np.float32)), 0.25 + 0.75 * 0.6)
    with pytest.raises(VideoError, match="alpha"):
        ExponentialSmoother(0)
