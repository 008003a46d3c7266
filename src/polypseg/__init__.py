"""polypseg: explainable polyp segmentation in colonoscopy images.

Public API::

    from polypseg import create_model, load_checkpoint, get_recipe
    model = create_model()                      # U-Net / ResNet-34, 1 output channel (logits)
    ckpt = load_checkpoint("runs/x/fold_0/best")  # safetensors + JSON, never unpickles
"""

__version__ = "0.1.0"

from polypseg.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from polypseg.config import ModelConfig, RunConfig, TrainConfig, get_recipe  # noqa: E402
from polypseg.models import create_model  # noqa: E402

__all__ = [
    "__version__",
    "create_model",
    "load_checkpoint",
    "save_checkpoint",
    "get_recipe",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
]
