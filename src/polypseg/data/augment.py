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
    The steps draw from ``generator`` in this order: flips, geometry, colour, degradation.
    """
    images, masks = _flips(images, masks, config, generator)
    images, masks = _geometric(images, masks, config, generator)
    images = _colour(images, config, generator)
    return _degrade(images, config, generator), masks


def _flips(
    images: torch.Tensor, masks: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal, then vertical flips, each image and its mask together."""
    n, device = images.shape[0], images.device
    flip_h = _chance(n, config.hflip, generator, device).view(n, 1, 1, 1)
    images = torch.where(flip_h, images.flip(3), images)
    masks = torch.where(flip_h, masks.flip(3), masks)
    flip_v = _chance(n, config.vflip, generator, device).view(n, 1, 1, 1)
    images = torch.where(flip_v, images.flip(2), images)
    masks = torch.where(flip_v, masks.flip(2), masks)
    return images, masks


def _geometric(
    images: torch.Tensor, masks: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation, random resized crop and zoom out as one affine warp: bilinear for the image,
    nearest-neighbour for the mask."""
    may_rotate = config.rotate_degrees > 0 and config.rotate_p > 0
    may_crop = config.crop_scale_min > 0 and config.crop_p > 0
    may_zoom_out = config.zoom_out_max > 1 and config.zoom_out_p > 0
    # Decided from the config alone, never from the drawn values: `if tensor.any()` would make the
    # host wait for the GPU at every step and stop it from queueing the next step's work. Each
    # option draws its random numbers only when it is on, so a config without it augments exactly
    # as it did before the option existed (and a resumed run repeats its draws).
    if not (may_rotate or may_crop or may_zoom_out):
        return images, masks
    n = images.shape[0]
    theta, moved = _affine(n, config, generator, images.device, rotate=may_rotate, crop=may_crop, zoom_out=may_zoom_out)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    moved_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved_masks = F.grid_sample(masks, grid.to(masks.dtype), mode="nearest", padding_mode="zeros", align_corners=False)
    moved = moved.view(n, 1, 1, 1)
    return torch.where(moved, moved_images, images), torch.where(moved, moved_masks, masks)


def _affine(
    n: int,
    config: AugmentConfig,
    generator: torch.Generator,
    device: torch.device,
    *,
    rotate: bool,
    crop: bool,
    zoom_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's affine matrix ``(N, 2, 3)`` for :func:`F.affine_grid`, and whether it moves at all.

    ``rotate``, ``crop`` and ``zoom_out`` say which options are on; an option that is off draws nothing.
    """
    off = torch.zeros(n, dtype=torch.bool, device=device)
    rotated = _chance(n, config.rotate_p, generator, device) if rotate else off
    cropped = _chance(n, config.crop_p, generator, device) if crop else off
    angle = _uniform(n, -config.rotate_degrees, config.rotate_degrees, generator, device) * math.pi / 180
    angle = torch.where(rotated, angle, torch.zeros_like(angle))
    # Random resized crop as a zoom: keep a share `area` of the image, at a random centre.
    area = _uniform(n, max(config.crop_scale_min, 1e-3), 1.0, generator, device)
    scale = torch.where(cropped, area.sqrt(), torch.ones_like(area))
    # Zoom out: the whole image shrunk by 1/scale inside a black border, at a random place.
    zoomed_out = torch.zeros_like(cropped)
    if zoom_out:
        zoomed_out = _chance(n, config.zoom_out_p, generator, device) & ~cropped
        zoom = _uniform(n, 1.0, config.zoom_out_max, generator, device)
        scale = torch.where(zoomed_out, zoom, scale)
    # |1 - scale| keeps a crop inside the image and a zoomed-out image inside the frame.
    shifted = cropped | zoomed_out
    shift_x = torch.where(shifted, _uniform(n, -1, 1, generator, device) * (1 - scale).abs(), torch.zeros_like(scale))
    shift_y = torch.where(shifted, _uniform(n, -1, 1, generator, device) * (1 - scale).abs(), torch.zeros_like(scale))
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    return theta, rotated | cropped | zoomed_out


def _colour(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Colour jitter (image only): brightness and contrast, then saturation, per-channel colour cast
    and gamma where the config turns them on."""
    colour_options = (config.brightness, config.contrast, config.hue_saturation, config.color_cast, config.gamma)
    if not (config.color_p > 0 and any(value > 0 for value in colour_options)):
        return images
    n, device = images.shape[0], images.device
    draw = lambda low, high: _uniform(n, low, high, generator, device).view(n, 1, 1, 1)  # noqa: E731
    jitter = _chance(n, config.color_p, generator, device).view(n, 1, 1, 1)
    brightness = draw(-config.brightness, config.brightness)
    contrast = draw(1 - config.contrast, 1 + config.contrast)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (images - mean) * contrast + mean + brightness
    if config.hue_saturation > 0:
        saturation = draw(1 - config.hue_saturation, 1 + config.hue_saturation)
        gray = 0.299 * jittered[:, :1] + 0.587 * jittered[:, 1:2] + 0.114 * jittered[:, 2:3]
        jittered = (jittered - gray) * saturation + gray
    if config.color_cast > 0:
        gains = _uniform(n * 3, 1 - config.color_cast, 1 + config.color_cast, generator, device)
        jittered = jittered * gains.view(n, 3, 1, 1)
    if config.gamma > 0:
        gamma = _uniform(n, -config.gamma, config.gamma, generator, device).exp().view(n, 1, 1, 1)
        jittered = jittered.clamp(0, 1) ** gamma
    return torch.where(jitter, jittered.clamp(0, 1), images)


def _degrade(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Optics and sensor of another endoscope: vignetting, highlights, blur, noise (image only)."""
    n, device = images.shape[0], images.device
    if config.vignette_strength > 0 and config.vignette_p > 0:
        chosen = _chance(n, config.vignette_p, generator, device).view(n, 1, 1, 1)
        strength = _uniform(n, 0, config.vignette_strength, generator, device).view(n, 1, 1, 1)
        centre = _uniform(2 * n, -0.3, 0.3, generator, device).view(n, 2, 1, 1)
        y, x = _coordinates(images)
        radius2 = ((x - centre[:, :1]) ** 2 + (y - centre[:, 1:]) ** 2) / 2
        images = torch.where(chosen, images * (1 - strength * radius2).clamp(min=0), images)
    if config.specular_p > 0:
        chosen = _chance(n, config.specular_p, generator, device).view(n, 1, 1, 1)
        images = torch.where(chosen, _add_highlights(images, generator), images)
    if config.blur_sigma > 0 and config.blur_p > 0:
        chosen = _chance(n, config.blur_p, generator, device).view(n, 1, 1, 1)
        sigma = _uniform(n, 0.1, max(config.blur_sigma, 0.1), generator, device)
        images = torch.where(chosen, _gaussian_blur(images, sigma, config.blur_sigma), images)
    if config.noise_std > 0 and config.noise_p > 0:
        chosen = _chance(n, config.noise_p, generator, device).view(n, 1, 1, 1)
        std = _uniform(n, 0, config.noise_std, generator, device).view(n, 1, 1, 1)
        noise = torch.randn(images.shape, generator=generator, device=device, dtype=images.dtype)
        images = torch.where(chosen, (images + noise * std).clamp(0, 1), images)
    return images


def _coordinates(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1], shaped (1, 1, H, 1) and (1, 1, 1, W)."""
    height, width = images.shape[-2:]
    y = torch.linspace(-1, 1, height, device=images.device, dtype=images.dtype).view(1, 1, height, 1)
    x = torch.linspace(-1, 1, width, device=images.device, dtype=images.dtype).view(1, 1, 1, width)
    return y, x


def _add_highlights(images: torch.Tensor, generator: torch.Generator, spots: int = 3) -> torch.Tensor:
    """One to ``spots`` small elliptical specular highlights per image, blended towards white."""
    n, device = images.shape[0], images.device
    draw = lambda low, high: _uniform(n * spots, low, high, generator, device).view(n, spots, 1, 1)  # noqa: E731
    cx, cy = draw(-0.9, 0.9), draw(-0.9, 0.9)
    rx, ry = draw(0.01, 0.06), draw(0.01, 0.06)
    strength = draw(0.6, 1.0)
    strength[:, 1:] *= draw(0, 1)[:, 1:] < 0.5  # the first spot always, each other one half the time
    y, x = _coordinates(images)
    spot = strength * torch.exp(-(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) / 2)
    light = spot.amax(dim=1, keepdim=True)
    return images + light * (1 - images)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each image with its own ``sigma`` (px): one separable grouped convolution for the batch."""
    n, channels, height, width = images.shape
    radius = max(1, math.ceil(2 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(images.dtype) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = images.reshape(1, n * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, 2 * radius + 1), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, 2 * radius + 1, 1), groups=n * channels)
    return flat.reshape(n, channels, height, width)
