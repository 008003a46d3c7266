"""Model-size probability maps brought to an image's size, and masks drawn over images.

Large frames are handled in stripes of rows (:func:`upsample_rows`), so nothing is held at full
size as floats: what ``polypseg predict`` writes costs about 8 bytes per pixel at peak.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def upsample_rows(small: np.ndarray, size: tuple[int, int], rows: int = 256) -> Iterator[tuple[int, int, np.ndarray]]:
    """Bilinear upsampling of a ``(h, w)`` map to ``(H, W)``, yielded as ``(start, stop, rows)`` stripes.

    The same interpolation as :func:`polypseg.data.transforms.resize_probabilities` (half-pixel centres,
    ``align_corners=False``, clamped to [0, 1]) to float rounding, without ever holding the whole
    ``(H, W)`` float map: peak memory is ``rows x W`` floats plus an ``h x W`` intermediate.
    """
    small = np.asarray(small, dtype=np.float32)
    height, width = int(size[0]), int(size[1])

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # float32 coordinates, as PyTorch's CPU kernel computes them
        scale = np.float32(n_in) / np.float32(n_out)
        source = np.maximum(
            (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0)
        )
        low = np.minimum(source.astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, (source - low.astype(np.float32)).astype(np.float32)

    y0, y1, wy = axis(small.shape[0], height)
    x0, x1, wx = axis(small.shape[1], width)
    columns = small[:, x0] * (1 - wx) + small[:, x1] * wx  # (h, W)
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        weight = wy[start:stop, None]
        stripe = columns[y0[start:stop]] * (1 - weight) + columns[y1[start:stop]] * weight
        yield start, stop, np.clip(stripe, 0.0, 1.0, out=stripe)


def upsample_mask(
    small: np.ndarray, size: tuple[int, int], threshold: float, rows: int = 256
) -> tuple[np.ndarray, float]:
    """``(probability >= threshold at (H, W), mean probability inside that mask)`` from a model-size map,
    one byte per pixel at full size."""
    mask = np.empty((int(size[0]), int(size[1])), dtype=bool)
    total, count = 0.0, 0
    for start, stop, stripe in upsample_rows(small, size, rows):
        inside = stripe >= threshold
        mask[start:stop] = inside
        total += float(stripe[inside].sum(dtype=np.float64))
        count += int(inside.sum())
    return mask, (total / count if count else 0.0)


def upsample_uint8(small: np.ndarray, size: tuple[int, int], scale: float = 255.0, rows: int = 256) -> np.ndarray:
    """A model-size map brought to ``(H, W)`` as ``uint8`` (``round(value * scale)``, clipped to 255)."""
    out = np.empty((int(size[0]), int(size[1])), dtype=np.uint8)
    for start, stop, stripe in upsample_rows(small, size, rows):
        out[start:stop] = np.clip(np.round(stripe * scale), 0, 255)
    return out


def overlay_mask_inplace(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0), alpha: float = 0.35, rows: int = 256
) -> np.ndarray:
    """:func:`overlay_mask` drawn into ``image`` itself, stripe by stripe (no full-size copies)."""
    from scipy.ndimage import binary_erosion

    if not mask.any():
        return image
    tint = np.asarray(color, dtype=np.float32)
    width = max(1, round(min(mask.shape) / 250))
    height = mask.shape[0]
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        # erode with `width` rows of context on each side, so stripes join exactly
        low, high = max(0, start - width), min(height, stop + width)
        window = mask[low:high]
        eroded = binary_erosion(window, iterations=width, border_value=0)
        if low > 0:
            eroded[:width] = False  # rows eroded only because the window ends there: not used below
        inner = slice(start - low, stop - low)
        part, stripe_mask = image[start:stop], mask[start:stop]
        part[stripe_mask] = ((1 - alpha) * part[stripe_mask].astype(np.float32) + alpha * tint).round().astype(np.uint8)
        outline = stripe_mask & ~eroded[inner]
        part[outline] = np.asarray(color, dtype=np.uint8)
    return image


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = (0, 255, 0),
    alpha: float = 0.35,
) -> np.ndarray:
    """The image with the mask tinted in ``color`` and its outline drawn opaque (``uint8 (H, W, 3)``)."""
    from scipy.ndimage import binary_erosion

    out = image.copy()
    if not mask.any():
        return out
    tint = np.asarray(color, dtype=np.float32)
    # Blend only the masked pixels: a full-frame float copy would cost more than the model on CPU.
    out[mask] = ((1 - alpha) * image[mask].astype(np.float32) + alpha * tint).round().astype(np.uint8)
    # Outline about 0.4% of the short side thick, so it stays visible on large frames.
    width = max(1, round(min(mask.shape) / 250))
    outline = mask & ~binary_erosion(mask, iterations=width, border_value=0)
    out[outline] = np.asarray(color, dtype=np.uint8)
    return out
