"""polypseg: explainable polyp segmentation in colonoscopy images.

Public API::

    from polypseg import create_model, load_checkpoint, get_recipe
    model = create_model()                      # U-Net / ResNet-34, 1 output channel (logits)
    ckpt = load_checkpoint("runs/x/fold_0/best")  # safetensors + JSON, never unpickles

The names are imported on first use (PEP 562), so ``import polypseg`` and the command line's
``--help`` and ``--version`` do not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polypseg._lazy import lazy_exports
from polypseg._version import __version__

# public name -> module that defines it
_LAZY = {
    "create_model": "polypseg.models.factory",
    "load_checkpoint": "polypseg.models.checkpoint",
    "save_checkpoint": "polypseg.models.checkpoint",
    "get_recipe": "polypseg.core.recipes",
    "ModelConfig": "polypseg.core.config",
    "RunConfig": "polypseg.core.config",
    "TrainConfig": "polypseg.core.config",
}

__all__ = ["__version__", *_LAZY]
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names are resolved by __getattr__
    # "X as X" marks a re-export (PEP 484), so linters do not call these imports unused.
    from polypseg.core.config import ModelConfig as ModelConfig
    from polypseg.core.config import RunConfig as RunConfig
    from polypseg.core.config import TrainConfig as TrainConfig
    from polypseg.core.recipes import get_recipe as get_recipe
    from polypseg.models.checkpoint import load_checkpoint as load_checkpoint
    from polypseg.models.checkpoint import save_checkpoint as save_checkpoint
    from polypseg.models.factory import create_model as create_model
