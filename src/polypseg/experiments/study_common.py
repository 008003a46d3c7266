"""What the studies share: their error, a model's metrics at each threshold, the flip-TTA override
(and how result files name it), and the number format of their tables."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from polypseg.core.config import TrainConfig
from polypseg.errors import PolypsegError
from polypseg.metrics.boundary import boundary_f1
from polypseg.training.evaluation import evaluate_probabilities

EXTERNAL_METRICS = ("dice", "iou", "boundary_f1", "sensitivity", "precision", "auc")


class StudyError(PolypsegError):
    """A study cannot start or continue (bad folders, mismatched runs)."""


def model_metrics(
    probs: torch.Tensor, masks: np.ndarray, thresholds: Sequence[float], tolerance: int
) -> dict[str, dict[str, float]]:
    """:data:`EXTERNAL_METRICS` of one model's probabilities at each threshold, keyed ``f"{t:g}"``."""
    metric = evaluate_probabilities(probs, masks, thresholds=thresholds)
    result = {}
    for t in thresholds:
        values = metric.at_threshold(t)
        values["boundary_f1"] = float(np.mean(boundary_f1(probs >= t, torch.from_numpy(masks), tolerance)))
        result[f"{t:g}"] = {m: float(values[m]) for m in EXTERNAL_METRICS}
    return result


def with_tta(recipe: TrainConfig, tta_flip: bool | None) -> TrainConfig:
    """The recipe's evaluation settings with flip TTA as asked (``None``: the recipe's own)."""
    return recipe if tta_flip is None else dataclasses.replace(recipe, tta_flip=tta_flip)


def tta_suffix(recipe: TrainConfig, tta_flip: bool | None) -> str:
    """How a result file's name says that TTA differs from the recipe's: ``_tta``, ``_no_tta`` or nothing."""
    if tta_flip is None or tta_flip == recipe.tta_flip:
        return ""
    return "_tta" if tta_flip else "_no_tta"


def score_text(value: Any, signed: bool = False) -> str:
    """A score as the studies' tables print it: four decimals (signed for differences), ``n/a`` if missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
