"""Batched prediction on preprocessed data and evaluation against masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from polypseg.inference.inferer import batch_slices, model_input, probability_runner, with_flip_tta
from polypseg.metrics.segmentation import DEFAULT_THRESHOLDS, SegmentationMetrics


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    tta_flip: bool = False,
    precision: str = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """Sigmoid probabilities ``float32 (N, S, S)`` on CPU for ``uint8`` images ``(N, S, S, 3)`` or ``(N, 3, S, S)``.

    ``precision`` follows :mod:`polypseg.core.precision` (``auto``: bf16 where the device has it).
    With ``tta_flip`` the probabilities of the image and its horizontal and vertical flips are averaged.
    """
    device = torch.device(device)
    model.eval()
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    run = probability_runner(model, device, precision)
    if tta_flip:
        run = with_flip_tta(run)
    out = torch.empty((images.shape[0], images.shape[2], images.shape[3]), dtype=torch.float32)
    for batch in batch_slices(images.shape[0], batch_size, "predicting" if progress else None):
        out[batch] = run(model_input(images[batch], device, precision))[:, 0].float().cpu()
    return out


def evaluate_probabilities(
    probs: torch.Tensor,
    masks: torch.Tensor | np.ndarray,
    stems: Sequence[str] | None = None,
    thresholds: Sequence[float] = (0.5,) + DEFAULT_THRESHOLDS,
    chunk: int = 64,
) -> SegmentationMetrics:
    """Accumulate metrics over ``probs (N, S, S)`` vs binary ``masks (N, S, S)`` in chunks."""
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(masks)
    metric = SegmentationMetrics(thresholds=thresholds)
    for batch in batch_slices(probs.shape[0], chunk):
        metric.update(probs[batch], masks[batch], None if stems is None else list(stems[batch]))
    return metric
