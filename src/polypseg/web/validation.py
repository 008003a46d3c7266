"""Upload checks: decode untrusted image bytes within size and pixel limits.

Every failure raises an :class:`UploadError` subclass carrying the HTTP status the API answers
with and a one-line message naming the upload, so bad input never becomes a 500.
Pixel dimensions are read from the file header *before* the pixel data is decoded, so a
decompression bomb (a small file claiming a huge image) is refused without allocating it.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from polypseg.data.images import ImageReadError, image_rgb, mask_foreground, mask_uint8, pil_pixels, planar_to_last
from polypseg.errors import PolypsegError

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000

# (magic prefix, format) for the formats the API accepts; WebP is checked separately (RIFF....WEBP).
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
)
ACCEPTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")


class UploadError(PolypsegError):
    """An upload the API refuses; ``status_code`` and ``code`` go into the JSON error."""

    status_code = 400
    code = "bad_upload"


class UploadTooLarge(UploadError):
    status_code = 413
    code = "upload_too_large"


class TooManyPixels(UploadError):
    status_code = 413
    code = "too_many_pixels"


class NotAnImage(UploadError):
    status_code = 415
    code = "not_an_image"


class NotAVideo(NotAnImage):
    code = "not_a_video"


class CorruptImage(UploadError):
    status_code = 400
    code = "corrupt_image"


class BadMultipart(UploadError):
    """A multipart body whose framing cannot be parsed (no boundary, truncated, no part at all)."""

    status_code = 400
    code = "bad_multipart"


class NoFile(UploadError):
    """A multipart upload without a file part."""

    status_code = 400
    code = "no_file"


class EmptyUpload(UploadError):
    """A file (or raw body) of zero bytes."""

    status_code = 400
    code = "empty_upload"


class MaskMismatch(UploadError):
    """A ground-truth mask whose size differs from the image's."""

    status_code = 400
    code = "mask_mismatch"


class MaskNotBinary(UploadError):
    """A corrected mask with values other than 0 and 255 (or 0 and 1)."""

    status_code = 400
    code = "mask_not_binary"


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is decoded."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's magic bytes, or ``None``."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_size(data: bytes, name: str, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, size: int | None = None) -> None:
    """Refuse empty uploads and uploads over ``max_bytes``. ``size``: the whole file's size when
    ``data`` holds only its first ``max_bytes + 1`` bytes (the message reports the file's size)."""
    if not data:
        raise EmptyUpload(f"{name}: the upload is empty")
    if len(data) > max_bytes:
        total = max(size or 0, len(data))
        exact = "" if size else "at least "
        raise UploadTooLarge(f"{name}: {exact}{_mb(total)} is over the upload limit of {_mb(max_bytes)}")


def probe_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read format and dimensions from the header only; enforce ``max_pixels``."""
    if not data:
        raise EmptyUpload(f"{name}: the upload is empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise NotAnImage(f"{name}: not an image (accepted: {', '.join(ACCEPTED_FORMATS)})")
    if fmt == "TIFF":
        width, height = _tiff_size(data, name)
    else:
        try:
            with _open_pil(data) as image:
                width, height = image.size
        except Image.DecompressionBombError as error:
            claimed = re.search(r"\((\d+) pixels\)", str(error))
            size = f"{int(claimed.group(1)):,} pixels" if claimed else "an image far larger than that"
            raise TooManyPixels(f"{name}: the header claims {size}, over the limit of {max_pixels:,}") from None
        except Exception as error:  # noqa: BLE001 - any header failure means the upload is unusable
            raise CorruptImage(f"{name}: cannot read the {fmt} header ({_reason(error)})") from None
    if width < 1 or height < 1:
        raise CorruptImage(f"{name}: the {fmt} header gives an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise TooManyPixels(f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,}")
    return ImageInfo(fmt, width, height)


def decode_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an upload to ``uint8`` RGB ``(H, W, 3)``, like :func:`polypseg.data.images.read_image`.

    Grayscale, RGBA, palette and 16-bit images are converted; truncated or corrupt files raise
    :class:`CorruptImage`. Probes the header first (see :func:`probe_image`).
    """
    info = probe_image(data, name, max_pixels)
    array = _decode_upload(data, name, info)
    array = _to_rgb(array, name)
    if array.shape[:2] != (info.height, info.width):
        raise CorruptImage(
            f"{name}: decoded size {array.shape[1]}x{array.shape[0]} "
            f"differs from the header's {info.width}x{info.height}"
        )
    return array


def decode_mask_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A ground-truth mask upload as ``bool (H, W)`` by :func:`polypseg.data.images.read_mask`'s rule:
    brightest colour channel > 127, a lossless 0/1 label map foreground where 1."""
    info = probe_image(data, name, max_pixels)
    array = _decode_upload(data, name, info)
    # the mask rule of files on disk: label maps read by their values, JPEG noise kept out
    try:
        pixels = mask_uint8(array, lossy=info.format == "JPEG")
    except PolypsegError:
        raise CorruptImage(f"{name}: unsupported pixel type {array.dtype}") from None
    try:
        return mask_foreground(pixels, name)
    except ImageReadError:
        raise CorruptImage(f"{name}: unexpected mask shape {array.shape}") from None


def decode_binary_mask(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A corrected mask upload as ``bool (H, W)``, refusing any pixel that is not clearly 0 or 255.

    Unlike a ground-truth mask (:func:`decode_mask_bytes`, binarised at > 127), a mask the server
    stores as training data must already be binary: every colour channel 0 or 255 (or a 0/1 label
    map), alpha opaque. A blurred or anti-aliased edge is refused rather than silently rounded.
    """
    info = probe_image(data, name, max_pixels)
    array = _decode_upload(data, name, info)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype.kind not in "ui":
        raise MaskNotBinary(f"{name}: a mask must hold integers 0 and 255, not {array.dtype}")
    if array.ndim == 3 and array.shape[2] in (2, 4):
        if np.any(array[:, :, -1] != array[:, :, -1].max()):
            raise MaskNotBinary(f"{name}: the mask has transparent pixels; send an opaque 0/255 mask")
        array = array[:, :, :-1]
    channels = array if array.ndim == 3 else array[:, :, None]
    if channels.ndim != 3:
        raise CorruptImage(f"{name}: unexpected mask shape {array.shape}")
    values = np.unique(channels)
    if channels.shape[2] > 1 and np.any(channels != channels[:, :, :1]):
        raise MaskNotBinary(f"{name}: the mask's colour channels differ; send a gray 0/255 mask")
    if set(values.tolist()) <= {0, 1}:
        return channels[:, :, 0] == 1
    if not set(values.tolist()) <= {0, 255}:
        off = int(np.count_nonzero((channels[:, :, 0] != 0) & (channels[:, :, 0] != 255)))
        raise MaskNotBinary(f"{name}: {off:,} pixels are neither 0 nor 255; a corrected mask must be binary")
    return channels[:, :, 0] == 255


def _decode_upload(data: bytes, name: str, info: ImageInfo) -> np.ndarray:
    """The upload's pixels (probed first by :func:`probe_image`); a decoder failure is an UploadError."""
    try:
        return _decode_tiff(data) if info.format == "TIFF" else _decode_pil(data)
    except Image.DecompressionBombError:
        raise TooManyPixels(f"{name}: image is over the pixel limit") from None
    except UploadError:
        raise
    except Exception as error:  # noqa: BLE001 - truncated data, bad compression stream, ...
        raise CorruptImage(f"{name}: truncated or corrupt {info.format} ({_reason(error)})") from None


def _open_pil(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's warning; its hard error still applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _decode_pil(data: bytes) -> np.ndarray:
    with _open_pil(data) as image:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
        return pil_pixels(image)  # the same pixel rules as a file read from disk


def _tiff_size(data: bytes, name: str) -> tuple[int, int]:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            return int(page.imagewidth), int(page.imagelength)
    except Exception as error:  # noqa: BLE001 - any tifffile failure means the upload is unusable
        raise CorruptImage(f"{name}: cannot read the TIFF header ({_reason(error)})") from None


def _decode_tiff(data: bytes) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        return planar_to_last(np.asarray(tif.pages.first.asarray()))


def _to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """The image rule of files on disk (:func:`polypseg.data.images.image_rgb`), as an upload error."""
    try:
        return image_rgb(array, name)
    except ImageReadError as error:  # "unsupported pixel type ..." or "cannot use NAME: unexpected image shape ..."
        reason = str(error).split(f"cannot use {name}: ", 1)[-1]
        raise CorruptImage(f"{name}: {reason}") from None


# Library messages sometimes name Python objects ("<_io.BytesIO object at 0x7f...>") or temporary
# files; neither means anything to the client, and object addresses leak server memory layout.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+[^<>]*?(?:0x[0-9a-fA-F]+|@\s*\d+)>")
_TEMP_PATH = re.compile(r"\s*'?(?:/[^\s'\":]*)?polypseg-upload-[^\s'\":]*'?")
_ERRNO = re.compile(r"\[Errno -?\d+\]\s*")


def clean_reason(error: BaseException | str, name: str = "") -> str:
    """One short line explaining ``error`` to a client: no object addresses, no temporary paths, no
    repeat of the upload's ``name`` (the message already starts with it)."""
    text = str(error).strip().splitlines()[0].strip() if str(error).strip() else ""
    if type(error).__name__ == "UnidentifiedImageError" or text.startswith("cannot identify image file"):
        return "damaged, or not really that format"
    text = _OBJECT_REPR.sub("", text)
    text = _TEMP_PATH.sub("", text)
    text = _ERRNO.sub("", text)
    if name:
        text = text.replace(f"'{name}'", "").replace(name, "")
    text = re.sub(r"\s*(?:''|\"\")", "", text)
    text = re.sub(r"\(\s*[:;,]?\s*\)", "", text)
    text = re.sub(r"\s+", " ", text).strip(" :;,-")
    text = re.sub(r"\s+([:;,)])", r"\1", text)
    text = re.sub(r"[:;,]+\)", ")", text)
    text = re.sub(r"^[:;,]\s*", "", text)
    if len(text) <= 8 and isinstance(error, BaseException):
        text = f"{type(error).__name__}: {text}".rstrip(": ")
    return text[:200]


def _reason(error: BaseException) -> str:
    return clean_reason(error)


def _mb(size: int) -> str:
    """A size for messages: exact bytes, with MB when that is more readable (``12,345,678 bytes (11.8 MB)``)."""
    if size < 1024 * 1024:
        return f"{size:,} bytes"
    return f"{size:,} bytes ({size / (1024 * 1024):.1f} MB)"
