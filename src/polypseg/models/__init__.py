"""Models: building them (a registry over segmentation-models-pytorch), checkpoints, shipped weights.

Modules: ``factory`` (``create_model``, ``check_model_config``), ``checkpoint`` (safetensors + JSON,
never unpickled), ``pretrained`` (the models in ``weights/`` that ship with polypseg).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polypseg._lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    "create_model": "polypseg.models.factory",
    "load_checkpoint": "polypseg.models.checkpoint",
    "save_checkpoint": "polypseg.models.checkpoint",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves the names
    from polypseg.models.checkpoint import load_checkpoint as load_checkpoint
    from polypseg.models.checkpoint import save_checkpoint as save_checkpoint
    from polypseg.models.factory import create_model as create_model
