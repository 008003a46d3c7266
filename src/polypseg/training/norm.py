"""Training mode with frozen parts: BatchNorm statistics (``train.freeze_norm``) and the encoder
(``train.freeze_encoder``)."""

from __future__ import annotations

from torch import nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def set_training_mode(model: nn.Module, *, freeze_norm: bool, freeze_encoder: bool = False) -> None:
    """``model.train()``; with ``freeze_norm``, its BatchNorm layers stay in eval mode (running
    statistics used and kept, scale and shift still trained); with ``freeze_encoder``, the whole
    encoder stays in eval mode (its weights are frozen by :func:`freeze_encoder_weights`)."""
    model.train()
    if freeze_norm:
        for module in model.modules():
            if isinstance(module, _BATCH_NORMS):
                module.eval()
    if freeze_encoder:
        encoder_of(model).eval()


def freeze_encoder_weights(model: nn.Module) -> None:
    """Stop the encoder's weights from learning: only the decoder and the head train."""
    for parameter in encoder_of(model).parameters():
        parameter.requires_grad_(False)


def encoder_of(model: nn.Module) -> nn.Module:
    """The model's encoder (every segmentation_models_pytorch model has one)."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"{type(model).__name__} has no encoder to freeze")
    return encoder
