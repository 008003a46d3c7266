"""A video's probabilities quantised to the page's threshold grid, so the page re-thresholds it alone.

The page's threshold slider moves in steps of 0.01 (0.01 ... 0.99). For each frame the server
sends a *level map*: an 8-bit image whose pixel value is the number of grid thresholds ``t`` with
``p >= t``, compared in float32 as the served mask is. The mask at the grid threshold ``k / 100``
is then exactly ``level >= k``, one byte per pixel instead of four, with no rounding at any grid
threshold. Beside it go the frame's area, mean confidence and IoU with the previous frame at every
grid threshold, so the per-frame numbers, the chart and the consistency follow the slider too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from polypseg.web import encoding

GRID_STEPS = 100
# float32, like the comparison of the served mask (float32 probabilities against the threshold).
GRID = (np.arange(1, GRID_STEPS, dtype=np.float64) / GRID_STEPS).astype(np.float32)


def level_map(probability: np.ndarray) -> np.ndarray:
    """``uint8`` (H, W): how many grid thresholds each pixel's probability reaches (0-99)."""
    return np.searchsorted(GRID, np.asarray(probability, dtype=np.float32), side="right").astype(np.uint8)


def _at_least(levels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """For each grid threshold k (1-99): the count (or weight sum) of pixels with level >= k."""
    per_level = np.bincount(levels.ravel(), weights=None if weights is None else weights.ravel(), minlength=GRID_STEPS)
    return np.cumsum(per_level[::-1])[::-1][1:]


class ThresholdLevelTrack:
    """Level maps and per-threshold statistics of a video's frames, added in order."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self._previous: tuple[np.ndarray, np.ndarray] | None = None  # (levels, areas) of the last frame

    def add(self, probability: np.ndarray) -> None:
        levels = level_map(probability)
        areas = _at_least(levels)
        sums = _at_least(levels, np.asarray(probability, dtype=np.float64))
        confidence = np.divide(sums, areas, out=np.zeros_like(sums), where=areas > 0)
        frame: dict[str, Any] = {
            "levels_png_base64": encoding.png_base64(levels),
            "area_pixels": [int(a) for a in areas],
            "mean_confidence": [round(float(c), 6) for c in confidence],
            "iou_with_previous": None,
        }
        if self._previous is not None:
            previous_levels, previous_areas = self._previous
            overlap = _at_least(np.minimum(levels, previous_levels))
            union = areas + previous_areas - overlap
            iou = np.divide(overlap, union, out=np.ones(union.shape), where=union > 0)  # both empty: 1.0
            frame["iou_with_previous"] = [round(float(v), 6) for v in iou]
        self._previous = (levels, areas)
        self.frames.append(frame)

    def body(self) -> dict[str, Any]:
        """The ``threshold_levels`` part of a ``/v1/segment-video`` answer."""
        return {"thresholds": [round(float(k) / GRID_STEPS, 2) for k in range(1, GRID_STEPS)], "frames": self.frames}
