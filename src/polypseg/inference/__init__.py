"""Inference: checkpoint -> masks, for every caller (predict, explain, reports, web app).

Modules: ``inferer`` (the one inference core: model input, batching, precision, flip TTA),
``predictor`` (``Predictor``: one checkpoint, a fold ensemble or an ONNX model, any image size),
``loading`` (the model source and the engine choice of ``Predictor.from_checkpoint``), ``runners``
(one per engine), ``masks`` (maps brought to image size in stripes, overlays), ``export`` (ONNX,
onnxruntime, OpenVINO, int8), ``deploy`` (what ``polypseg export`` does), ``video``,
``predict_files`` (what ``polypseg predict`` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polypseg._lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    "Predictor": "polypseg.inference.predictor",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves the names
    from polypseg.inference.predictor import Predictor as Predictor
