"""Explanation: Grad-CAM for segmentation, measured.

Modules: ``gradcam`` (targets as plain callables, ``SegmentationGradCAM`` with hooks released in a
context manager, ``GradCAMDriver``: the one batch loop every caller uses), ``engine_gradcam`` (the same
Grad-CAM on forward-only CPU engines), ``metrics`` (heatmaps against masks and against the model),
``gallery`` (panels and the HTML gallery), ``files`` (what ``polypseg explain`` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polypseg._lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    "SegmentationGradCAM": "polypseg.explain.gradcam",
    "GradCAMDriver": "polypseg.explain.gradcam",
    "MaskedLogitSum": "polypseg.explain.gradcam",
    "explain_images": "polypseg.explain.gradcam",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves the names
    from polypseg.explain.gradcam import GradCAMDriver as GradCAMDriver
    from polypseg.explain.gradcam import MaskedLogitSum as MaskedLogitSum
    from polypseg.explain.gradcam import SegmentationGradCAM as SegmentationGradCAM
    from polypseg.explain.gradcam import explain_images as explain_images
