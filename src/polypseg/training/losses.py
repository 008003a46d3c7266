"""Loss registry over segmentation-models-pytorch's losses (all take logits).

``dice`` is the paper's loss. ``dice_bce`` adds pixel-wise BCE, which gives useful gradients
early in training from random init, where soft Dice alone is flat.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, TverskyLoss

from polypseg.core.config import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sum(*terms: LossFn) -> LossFn:
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(term(logits, target) for term in terms)  # type: ignore[return-value]

    return loss


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target)


LOSSES: dict[str, Callable[[], LossFn]] = {
    "dice": lambda: DiceLoss(mode="binary", from_logits=True),
    "bce": lambda: _bce,
    "dice_bce": lambda: _sum(DiceLoss(mode="binary", from_logits=True), _bce),
    "focal_dice": lambda: _sum(DiceLoss(mode="binary", from_logits=True), FocalLoss(mode="binary")),
    "tversky": lambda: TverskyLoss(mode="binary", from_logits=True, alpha=0.3, beta=0.7),
}


def create_loss(name: str) -> LossFn:
    """Build a loss ``f(logits (N,1,H,W), target (N,1,H,W) float) -> scalar`` by name."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)}")
    loss = LOSSES[name]()

    def computed_in_float32(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss(logits.float(), target.float())

    return computed_in_float32
