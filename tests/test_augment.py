"""Batched augmentation: image and mask move together, masks stay binary, seeded = repeatable."""

import torch

from polypseg.core.config import AugmentConfig
from polypseg.data.augment import augment_batch


def _batch(n: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        masks[i, 0, 4 + i : 14 + i, 6 : 20 + i] = 1
    images = masks.repeat(1, 3, 1, 1) * 0.8 + 0.1  # image = mask, so alignment is checkable
    return images, masks


def test_flips_move_image_and_mask_together():
    images, masks = _batch()
    config = AugmentConfig(hflip=0.5, vflip=0.5, rotate_p=0, color_p=0)
    out_images, out_masks = augment_batch(images, masks, config, torch.Generator().manual_seed(1))
    assert torch.equal((out_images[:, :1] > 0.5).float(), out_masks)
    assert not torch.equal(out_masks, masks)  # something was flipped


def test_rotation_and_crop_keep_mask_binary_and_aligned():
    images, masks = _batch()
    config = AugmentConfig(hflip=0, vflip=0, rotate_degrees=40, rotate_p=1.0, crop_scale_min=0.5, crop_p=1.0, color_p=0)
    out_images, out_masks = augment_batch(images, masks, config, torch.Generator().manual_seed(2))
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    agreement = ((out_images[:, :1] > 0.5).float() == out_masks).float().mean()
    assert agreement > 0.97  # bilinear image vs nearest mask differ only on edge pixels
    assert not torch.equal(out_masks, masks)


def test_color_jitter_changes_image_not_mask():
    images, masks = _batch()
    config = AugmentConfig(hflip=0, vflip=0, rotate_p=0, brightness=0.3, contrast=0.3, color_p=1.0, hue_saturation=0.2)
    out_images, out_masks = augment_batch(images, masks, config, torch.Generator().manual_seed(3))
    assert torch.equal(out_masks, masks)
    assert not torch.allclose(out_images, images)
    assert out_images.min() >= 0 and out_images.max() <= 1


def test_seeded_augmentation_is_repeatable():
    images, masks = _batch()
    config = AugmentConfig(crop_scale_min=0.6, crop_p=0.5)
    a = augment_batch(images, masks, config, torch.Generator().manual_seed(7))
    b = augment_batch(images, masks, config, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
