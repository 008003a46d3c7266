"""Limits and options of one web app instance (the ``polypseg serve`` flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polypseg.web.validation import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES
from polypseg.web.video_jobs import DEFAULT_MAX_FRAMES


@dataclass
class WebSettings:
    """Limits and options of one app instance (``polypseg serve`` flags)."""

    token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    request_timeout: float = 120.0
    samples_dir: Path | None = None
    max_video_frames: int = DEFAULT_MAX_FRAMES
    review_dir: Path | None = None  # where verdicts and corrected masks are kept; None: no review routes
