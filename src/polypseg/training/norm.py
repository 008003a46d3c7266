"""Training mode with frozen normalisation statistics (``train.freeze_norm``)."""

from __future__ import annotations

from torch import nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def set_training_mode(model: nn.Module, *, freeze_norm: bool) -> None:
    """``model.train()``; with ``freeze_norm``, its BatchNorm layers stay in eval mode (running
    statistics used and kept, scale and shift still trained)."""
    model.train()
    if freeze_norm:
        for module in model.modules():
            if isinstance(module, _BATCH_NORMS):
                module.eval()
