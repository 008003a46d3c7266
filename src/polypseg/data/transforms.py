"""Tensor preprocessing shared by training, evaluation, inference and explanation.

One place defines how an RGB ``uint8`` image becomes model input, so every path feeds the model
the same numbers (ImageNet mean/std normalisation, fixed: never per-image min-max).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from polypseg.core.config import IMAGENET_MEAN, IMAGENET_STD


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` or ``[0, 1]`` float ``(N, 3, H, W)`` -> ImageNet-normalised float32."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """``uint8 (N, H, W, 3)`` or ``(H, W, 3)`` numpy -> ``uint8 (N, 3, H, W)`` tensor (no copy of values)."""
    if images.ndim == 3:
        images = images[None]
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """Resize RGB ``uint8`` images (any sizes, a list or an array) to ``size`` and normalise."""
    from polypseg.data.images import resize_image

    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    resized = np.stack([img if img.shape[:2] == (size, size) else resize_image(img, size) for img in images])
    return normalize(images_to_tensor(resized))


def resize_probabilities(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of probability maps ``(N, 1, h, w)`` back to an original ``(H, W)``.

    Probabilities (not masks) are interpolated; thresholding happens after, at full size.
    """
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
