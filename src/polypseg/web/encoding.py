"""Encodings used by the API responses: PNG as base64, COCO-style RLE, heatmap overlays."""

from __future__ import annotations

import base64
import io
from functools import lru_cache

import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG of a ``uint8``/``uint16`` gray ``(H, W)`` or ``uint8`` RGB ``(H, W, 3)`` array."""
    buffer = io.BytesIO()
    if array.dtype == np.uint16 and array.ndim != 2:
        raise ValueError("16-bit PNG is supported for single-channel arrays only")
    dtype = np.uint16 if array.dtype == np.uint16 else np.uint8
    image = Image.fromarray(np.ascontiguousarray(array, dtype=dtype))  # uint16 (H, W) -> mode I;16
    # compress_level 1: several times faster than the default, maps are small anyway.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def png_base64(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def jpeg_base64(image: np.ndarray, quality: int = 92) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    """``bool`` mask -> 0/255 ``uint8``."""
    return mask.astype(np.uint8) * 255


def unit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> ``round(v * 255)`` as ``uint8``."""
    return np.clip(np.rint(np.asarray(values, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def unit_to_uint16(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> ``round(v * 65535)`` as ``uint16``."""
    return np.clip(np.rint(np.asarray(values, dtype=np.float64) * 65535.0), 0, 65535).astype(np.uint16)


def rle_encode(mask: np.ndarray) -> dict[str, object]:
    """COCO uncompressed RLE: ``{"size": [H, W], "counts": [...]}``.

    Column-major (Fortran) order like COCO; counts alternate background/foreground runs and
    always start with a background run (0 when the first pixel is foreground).
    """
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": []}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict[str, object]) -> np.ndarray:
    """Inverse of :func:`rle_encode`."""
    height, width = (int(v) for v in rle["size"])  # type: ignore[union-attr]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {height * width}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((height, width), order="F")


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def colorize(values: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Map values in [0, 1] to an RGB ``uint8`` image with a matplotlib colormap."""
    return _lut(cmap)[unit_to_uint8(values)]


def heatmap_overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "viridis") -> np.ndarray:
    """Blend a [0, 1] heatmap over an RGB ``uint8`` image, like pytorch-grad-cam's ``show_cam_on_image``.

    The default palette is viridis (perceptually uniform, readable with colour-vision deficiencies), not jet.
    """
    colored = colorize(heatmap, cmap).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colored
    return np.clip(blended, 0, 255).round().astype(np.uint8)
