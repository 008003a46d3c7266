"""Reading one image or mask file: the pixel rules every reader in polypseg shares, and resizing.

Images become ``uint8`` RGB ``(H, W, 3)``; masks are reduced to one channel and binarised at ``> 127``
at their original resolution (label maps read by their values, see :func:`read_mask`). Resizing a
mask is always nearest-neighbour, so it stays binary. Files on disk and the web app's uploads decode
through the same functions, so the two can never read one image differently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from polypseg.errors import PolypsegError

# Large enough for any colonoscopy frame, small enough to stop decompression bombs.
Image.MAX_IMAGE_PIXELS = 100_000_000
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


class DataError(PolypsegError):
    """A dataset folder or file cannot be used; the message names the path."""


class ImageReadError(DataError):
    """One image or mask file cannot be decoded."""


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Any integer, bool or float pixel array -> uint8, scaled by the dtype's range (never per image)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit (or wider) data: scale by the dtype's range, not per image, so a fixed
        # threshold means the same thing for every file.
        max_value = np.iinfo(array.dtype).max
        return (array.astype(np.float64) * (255.0 / max_value)).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(array)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
    raise ImageReadError(f"unsupported pixel type {array.dtype}")


def pil_pixels(image: Image.Image) -> np.ndarray:
    """A loaded Pillow image's pixels in a form the rules below read: palette, CMYK, YCbCr, LAB, HSV
    to RGB(A), 1-bit and float to 8-bit gray, 16- and 32-bit integer gray to uint16.

    The one place that reads Pillow modes: files (:func:`read_image`, :func:`read_mask`) and the web
    app's uploads both decode through it, so the two can never read one image differently."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "I" or image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.uint16 if image.mode.startswith("I;16") else np.int64)
        if array.dtype == np.int64:
            array = np.clip(array, 0, 65535).astype(np.uint16)
        return array
    elif image.mode in ("1", "F"):
        image = image.convert("L")
    elif image.mode == "LA":
        image = image.convert("RGBA")
    elif image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    return np.asarray(image)


def planar_to_last(array: np.ndarray) -> np.ndarray:
    """A planar TIFF's ``(C, H, W)`` pixels as ``(H, W, C)``; other arrays unchanged."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    return array


def _decode(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as image:
                image.load()
                array = pil_pixels(image)
    except FileNotFoundError:
        raise ImageReadError(f"file not found: {path}") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure means this file is unusable
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageReadError(f"cannot decode {path}: {reason}") from None
    return planar_to_last(array)


def read_image(path: Path | str) -> np.ndarray:
    """Read an image as ``uint8`` RGB ``(H, W, 3)``; grayscale, RGBA and 16-bit are converted."""
    path = Path(path)
    return image_rgb(_decode(path), str(path))


def image_rgb(pixels: np.ndarray, name: str) -> np.ndarray:
    """Decoded image pixels as ``uint8`` RGB ``(H, W, 3)`` (the rule for every image polypseg reads)."""
    array = to_uint8(pixels)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]  # colonoscopy frames have no meaningful transparency
    elif array.ndim == 3 and array.shape[2] == 2:
        array = np.repeat(array[:, :, :1], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ImageReadError(f"cannot use {name}: unexpected image shape {array.shape}")
    return np.ascontiguousarray(array)


def read_mask_uint8(path: Path) -> np.ndarray:
    """A mask file's pixels as uint8 0-255, label maps read by their values (see :func:`read_mask`)."""
    return mask_uint8(_decode(path), lossy=path.suffix.lower() in LOSSY_SUFFIXES)


def mask_uint8(raw: np.ndarray, lossy: bool) -> np.ndarray:
    """Decoded mask pixels as uint8 0-255, label maps read by their values (see :func:`read_mask`).

    ``lossy``: the pixels came from a JPEG, where a 1 is compression noise, not a label."""
    if np.issubdtype(raw.dtype, np.integer) and raw.size:
        peak = int(raw.max())
        if peak == 1 and not lossy:
            return raw.astype(np.uint8) * 255
        if raw.dtype.itemsize > 1 and 1 < peak <= 255:
            return raw.astype(np.uint8)
    return to_uint8(raw)


def read_mask(path: Path | str) -> np.ndarray:
    """Read a mask as ``bool (H, W)``: one channel (max over colour channels), binarised at > 127.

    Label maps are read by their values, not their dtype's range: a lossless 0/1 mask (PNG, TIFF)
    is foreground where 1, and a 16-bit file holding 0/255 is read as 8-bit. Scaling either by its
    dtype would make every mask empty, and a model trained on them would score a perfect Dice.
    JPEG masks keep the > 127 rule: compression noise near 0 must not become foreground.
    """
    path = Path(path)
    return mask_foreground(read_mask_uint8(path), f"mask {path}")


def mask_foreground(pixels: np.ndarray, name: str) -> np.ndarray:
    """Mask pixels (uint8 0-255, from :func:`mask_uint8`) as ``bool (H, W)``: max over colour, > 127."""
    array = pixels
    if array.ndim == 3:
        array = array[:, :, :3].max(axis=2) if array.shape[2] >= 3 else array[:, :, 0]
    if array.ndim != 2:
        raise ImageReadError(f"cannot use {name}: unexpected shape {array.shape}")
    return array > 127


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB ``uint8`` image to ``size`` (int = square, or ``(height, width)``), antialiased."""
    height, width = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a binary mask with nearest-neighbour, so it stays binary."""
    height, width = (size, size) if isinstance(size, int) else size
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    return np.asarray(resized) > 127
