"""Batched augmentation on tensors, on whatever device the batch lives on.

Written by hand rather than with albumentations/torchvision.transforms.v2 because it runs on the
whole batch at once on the GPU (one ``grid_sample`` for all geometric transforms), so training
never waits on per-image CPU work. Image and mask share every geometric transform; the mask is
resampled with nearest-neighbour, so it stays exactly binary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from polypseg.core.config import AugmentConfig


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def _chance(n: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``images`` (N, 3, H, W) in [0, 1] and ``masks`` (N, 1, H, W) in {0, 1} together.

    ``generator`` must live on the batch's device; seeding it makes the augmentation repeatable.
    """
    n, device = images.shape[0], images.device
    rand = lambda p: _chance(n, p, generator, device)  # noqa: E731

    flip_h = rand(config.hflip).view(n, 1, 1, 1)
    images = torch.where(flip_h, images.flip(3), images)
    masks = torch.where(flip_h, masks.flip(3), masks)
    flip_v = rand(config.vflip).view(n, 1, 1, 1)
    images = torch.where(flip_v, images.flip(2), images)
    masks = torch.where(flip_v, masks.flip(2), masks)

    may_rotate = config.rotate_degrees > 0 and config.rotate_p > 0
    may_crop = config.crop_scale_min > 0 and config.crop_p > 0
    # Decided from the config alone, never from the drawn values: `if tensor.any()` would make the
    # host wait for the GPU at every step and stop it from queueing the next step's work.
    if may_rotate or may_crop:
        rotate = rand(config.rotate_p) if may_rotate else torch.zeros(n, dtype=torch.bool, device=device)
        crop = rand(config.crop_p) if may_crop else torch.zeros(n, dtype=torch.bool, device=device)
        angle = _uniform(n, -config.rotate_degrees, config.rotate_degrees, generator, device) * math.pi / 180
        angle = torch.where(rotate, angle, torch.zeros_like(angle))
        # Random resized crop as a zoom: keep a share `area` of the image, at a random centre.
        area = _uniform(n, max(config.crop_scale_min, 1e-3), 1.0, generator, device)
        scale = torch.where(crop, area.sqrt(), torch.ones_like(area))
        shift_x = torch.where(crop, _uniform(n, -1, 1, generator, device) * (1 - scale), torch.zeros_like(scale))
        shift_y = torch.where(crop, _uniform(n, -1, 1, generator, device) * (1 - scale), torch.zeros_like(scale))
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1).to(
            images.dtype
        )
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        moved_masks = F.grid_sample(
            masks, grid.to(masks.dtype), mode="nearest", padding_mode="zeros", align_corners=False
        )
        moved = (rotate | crop).view(n, 1, 1, 1)
        images = torch.where(moved, moved_images, images)
        masks = torch.where(moved, moved_masks, masks)

    if config.color_p > 0 and (config.brightness > 0 or config.contrast > 0 or config.hue_saturation > 0):
        jitter = rand(config.color_p).view(n, 1, 1, 1)
        brightness = _uniform(n, -config.brightness, config.brightness, generator, device).view(n, 1, 1, 1)
        contrast = _uniform(n, 1 - config.contrast, 1 + config.contrast, generator, device).view(n, 1, 1, 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        jittered = (images - mean) * contrast + mean + brightness
        if config.hue_saturation > 0:
            saturation = _uniform(n, 1 - config.hue_saturation, 1 + config.hue_saturation, generator, device).view(
                n, 1, 1, 1
            )
            gray = 0.299 * jittered[:, :1] + 0.587 * jittered[:, 1:2] + 0.114 * jittered[:, 2:3]
            jittered = (jittered - gray) * saturation + gray
        images = torch.where(jitter, jittered.clamp(0, 1), images)
    return images, masks
