"""polypseg: explainable polyp segmentation in colonoscopy images.

Public API::

    from polypseg import create_model, load_checkpoint, get_recipe
    model = create_model()                      # U-Net / ResNet-34, 1 output channel (logits)
    ckpt = load_checkpoint("runs/x/fold_0/best")  # safetensors + JSON, never unpickles

The names are imported on first use (PEP 562), so ``import polypseg`` and the command line's
``--help`` and ``--version`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from polypseg._version import __version__

# public name -> module that defines it
_LAZY = {
    "create_model": "polypseg.models",
    "load_checkpoint": "polypseg.checkpoint",
    "save_checkpoint": "polypseg.checkpoint",
    "get_recipe": "polypseg.config",
    "ModelConfig": "polypseg.config",
    "RunConfig": "polypseg.config",
    "TrainConfig": "polypseg.config",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names are resolved by __getattr__
    # "X as X" marks a re-export (PEP 484), so linters do not call these imports unused.
    from polypseg.checkpoint import load_checkpoint as load_checkpoint
    from polypseg.checkpoint import save_checkpoint as save_checkpoint
    from polypseg.config import ModelConfig as ModelConfig
    from polypseg.config import RunConfig as RunConfig
    from polypseg.config import TrainConfig as TrainConfig
    from polypseg.config import get_recipe as get_recipe
    from polypseg.models import create_model as create_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'polypseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
