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


def _cross_centre(**changes: float) -> AugmentConfig:
    """Geometry and colour jitter off, so each test sees one cross-centre option alone."""
    return AugmentConfig(
        **{"hflip": 0, "vflip": 0, "rotate_p": 0, "color_p": 0, "brightness": 0, "contrast": 0, **changes}
    )


def test_options_that_are_off_draw_nothing_so_old_configs_augment_as_before():
    images, masks = _batch()
    generator = torch.Generator().manual_seed(4)
    augment_batch(images, masks, AugmentConfig(crop_scale_min=0.6, crop_p=0.5, hue_saturation=0.1), generator)
    untouched = torch.Generator().manual_seed(4)
    # the draws this config made before the cross-centre options existed: 2 flips, 6 for rotation and
    # crop, 4 for the colour jitter, one number per image each
    for _ in range(2 + 6 + 4):
        torch.rand(len(images), generator=untouched)
    assert torch.equal(generator.get_state(), untouched.get_state())


def test_zoom_out_shrinks_image_and_mask_together_into_a_black_border():
    images, masks = _batch()
    out_images, out_masks = augment_batch(
        images, masks, _cross_centre(zoom_out_max=2.0, zoom_out_p=1.0), torch.Generator().manual_seed(5)
    )
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert out_masks.sum() < masks.sum()  # every polyp got smaller
    assert ((out_images[:, :1] > 0.5).float() == out_masks).float().mean() > 0.97
    assert (out_images == 0).any()  # the border the image shrank away from is black


def test_photometric_options_change_the_image_within_range_and_never_the_mask():
    images, masks = _batch()
    for option in (
        {"color_cast": 0.2, "color_p": 1.0},
        {"gamma": 0.5, "color_p": 1.0},
        {"vignette_strength": 0.8, "vignette_p": 1.0},
        {"specular_p": 1.0},
        {"blur_sigma": 2.0, "blur_p": 1.0},
        {"noise_std": 0.1, "noise_p": 1.0},
    ):
        out_images, out_masks = augment_batch(images, masks, _cross_centre(**option), torch.Generator().manual_seed(6))
        assert torch.equal(out_masks, masks), option
        assert not torch.allclose(out_images, images), option
        assert out_images.min() >= 0 and out_images.max() <= 1, option


def test_blur_softens_edges_and_keeps_mean_brightness():
    images, masks = _batch()
    out_images, _ = augment_batch(
        images, masks, _cross_centre(blur_sigma=3.0, blur_p=1.0), torch.Generator().manual_seed(8)
    )
    edge = lambda x: (x[..., :, 1:] - x[..., :, :-1]).abs().sum()  # noqa: E731
    assert edge(out_images) < edge(images)
    assert torch.allclose(out_images.mean(), images.mean(), atol=0.01)


def test_vignetting_darkens_corners_more_than_the_centre():
    images = torch.full((4, 3, 32, 32), 0.8)
    masks = torch.zeros(4, 1, 32, 32)
    out_images, _ = augment_batch(
        images, masks, _cross_centre(vignette_strength=1.0, vignette_p=1.0), torch.Generator().manual_seed(9)
    )
    assert (out_images[:, :, 0, 0] < out_images[:, :, 16, 16]).all()
