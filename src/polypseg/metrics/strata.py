"""Scores by stratum: how a model does on small and large polyps, dark and bright images.

A mean Dice hides where a model fails. Splitting the per-image scores by the polyp's share of the
image and by the image's brightness tells a user where to trust it. The bins are fixed (not fitted
to a test set), so two models, or two datasets, are compared bin for bin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from polypseg.metrics.segmentation import bootstrap_ci

# (low, high, label): the polyp's share of the image's pixels, from its ground-truth mask.
POLYP_SIZE_BINS: tuple[tuple[float, float, str], ...] = (
    (0.0, 0.03, "polyp under 3% of the image"),
    (0.03, 0.10, "polyp 3-10%"),
    (0.10, 0.25, "polyp 10-25%"),
    (0.25, 1.0 + 1e-9, "polyp over 25%"),
)
# (low, high, label): the image's mean luma (ITU-R BT.601, 0-255).
BRIGHTNESS_BINS: tuple[tuple[float, float, str], ...] = (
    (0.0, 90.0, "dark (mean luma under 90)"),
    (90.0, 110.0, "medium (90-110)"),
    (110.0, 256.0, "bright (110 and over)"),
)


@dataclass(frozen=True)
class StratumScore:
    """The mean of a per-image score over the images of one stratum, with its 95% bootstrap interval."""

    label: str
    images: int
    mean: float
    ci95_low: float
    ci95_high: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def polyp_fraction(mask: np.ndarray) -> float:
    """The share of a mask's pixels that are polyp (any non-zero value)."""
    return float(np.count_nonzero(mask)) / mask.size


def mean_luma(image: np.ndarray) -> float:
    """Mean brightness of an RGB uint8 image, 0-255 (BT.601 weights, as JPEG's Y)."""
    rgb = image.reshape(-1, image.shape[-1])[:, :3].astype(np.float64)
    return float((rgb @ np.array([0.299, 0.587, 0.114])).mean())


def scores_by_stratum(
    scores: Sequence[float], measures: Sequence[float], bins: Sequence[tuple[float, float, str]]
) -> list[StratumScore]:
    """Group per-image ``scores`` by the bin (``low <= measure < high``) of each image's ``measure``.

    Every image must fall in exactly one bin, else a ValueError: a silently dropped image would
    make the strata disagree with the overall mean. Empty bins are kept, with NaN scores.
    """
    scores_array, measures_array = np.asarray(scores, dtype=np.float64), np.asarray(measures, dtype=np.float64)
    if scores_array.shape != measures_array.shape:
        raise ValueError(f"{len(scores_array)} scores but {len(measures_array)} measures")
    masks = [(measures_array >= low) & (measures_array < high) for low, high, _ in bins]
    counts = np.sum(masks, axis=0)
    if (counts != 1).any():
        raise ValueError(f"measure {measures_array[counts != 1][0]!r} falls in {counts[counts != 1][0]} bins, not one")
    strata = []
    for (_, _, label), inside in zip(bins, masks, strict=True):
        values = scores_array[inside]
        mean = float(values.mean()) if values.size else float("nan")
        low, high = bootstrap_ci(values)
        strata.append(StratumScore(label=label, images=int(values.size), mean=mean, ci95_low=low, ci95_high=high))
    return strata


def strata_markdown(strata: Sequence[StratumScore], score_name: str = "Dice") -> str:
    """A markdown table: stratum, images, mean score and its 95% interval."""
    lines = [f"| stratum | images | mean {score_name} | 95% CI |", "| --- | --- | --- | --- |"]
    for stratum in strata:
        interval = "n/a" if np.isnan(stratum.ci95_low) else f"{stratum.ci95_low:.3f}-{stratum.ci95_high:.3f}"
        mean = "n/a" if np.isnan(stratum.mean) else f"{stratum.mean:.4f}"
        lines.append(f"| {stratum.label} | {stratum.images} | {mean} | {interval} |")
    return "\n".join(lines) + "\n"
