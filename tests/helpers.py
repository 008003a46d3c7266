"""Small builders shared by the tests (tiny models and datasets that run in seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from polypseg.core.config import RunConfig
from polypseg.core.recipes import get_recipe

TINY_MODEL = {"encoder": "resnet18", "decoder_channels": (16, 16, 16, 16, 16)}
# For tests that train and save many times (resumes, kills): timm's LCNet-0.35 has 0.2M parameters and
# BatchNorm like the real encoders, and trains and saves in about half the time of MobileNetV2 at 32 px.
QUICK_ENCODER = "tu-lcnet_035"


def tiny_config(recipe: str = "demo", epochs: int = 1, image_size: int = 64) -> RunConfig:
    config = get_recipe(recipe)
    config.model.encoder = TINY_MODEL["encoder"]
    config.model.decoder_channels = TINY_MODEL["decoder_channels"]
    config.train.epochs = epochs
    config.train.image_size = image_size
    config.train.batch_size = 4
    config.train.eval_batch_size = 8
    return config


def write_synthetic_dataset(root: Path, n: int = 6, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """images/ (jpg) + masks/ (png): a bright disc on a dark textured background."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    for i in range(n):
        cy, cx, r = rng.integers(10, height - 10), rng.integers(10, width - 10), rng.integers(5, 9)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        image = rng.integers(20, 90, size=(height, width, 3), dtype=np.uint8)
        image[mask] = [200, 120, 110]
        Image.fromarray(image).save(root / "images" / f"case{i:02d}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"case{i:02d}.png")
    return root


def save_tiny_checkpoint(folder: Path, encoder: str = "resnet18") -> Path:
    """A random (seed 0) 32-px U-Net/ResNet-18 with an 8-channel decoder saved as ``folder/best``;
    returns the weights file. For tests of engines and inputs, where the weights do not matter.
    ``encoder=QUICK_ENCODER`` makes a 0.7 MB file instead of 45 MB, for tests that copy it many times."""
    import torch

    from polypseg.core.config import ModelConfig, TrainConfig
    from polypseg.models.checkpoint import save_checkpoint
    from polypseg.models.factory import create_model

    torch.manual_seed(0)
    config = RunConfig(
        model=ModelConfig(encoder=encoder, decoder_channels=(8, 8, 8, 8, 8)), train=TrainConfig(image_size=32)
    )
    return save_checkpoint(folder / "best", create_model(config.model), config)


def copy_into_folds(checkpoint: Path, run: Path, folds: int = 2) -> Path:
    """A CV-shaped run folder ``run`` whose ``fold_K/best`` are copies of ``checkpoint`` (no summary)."""
    for fold in range(folds):
        (run / f"fold_{fold}").mkdir(parents=True)
        for suffix in (".safetensors", ".json"):
            (run / f"fold_{fold}" / f"best{suffix}").write_bytes(checkpoint.with_suffix(suffix).read_bytes())
    return run


def block_import(monkeypatch, module: str) -> None:
    """Make ``import module`` fail as on a machine without it (an optional extra not installed)."""
    import builtins

    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == module:
            raise ImportError(f"No module named '{module}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
