"""Segmentation metrics as functions plus an accumulator (MONAI's pattern), and boundary F1.

>>> from polypseg.metrics import dice_score, SegmentationMetrics, boundary_f1
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polypseg._lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    "confusion": "polypseg.metrics.segmentation",
    "dice_score": "polypseg.metrics.segmentation",
    "iou_score": "polypseg.metrics.segmentation",
    "roc_auc_exact": "polypseg.metrics.segmentation",
    "SegmentationMetrics": "polypseg.metrics.segmentation",
    "bootstrap_ci": "polypseg.metrics.segmentation",
    "boundary_f1": "polypseg.metrics.boundary",
    "boundary_scores": "polypseg.metrics.boundary",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves the names
    from polypseg.metrics.boundary import boundary_f1 as boundary_f1
    from polypseg.metrics.boundary import boundary_scores as boundary_scores
    from polypseg.metrics.segmentation import SegmentationMetrics as SegmentationMetrics
    from polypseg.metrics.segmentation import bootstrap_ci as bootstrap_ci
    from polypseg.metrics.segmentation import confusion as confusion
    from polypseg.metrics.segmentation import dice_score as dice_score
    from polypseg.metrics.segmentation import iou_score as iou_score
    from polypseg.metrics.segmentation import roc_auc_exact as roc_auc_exact
