"""Response bodies of the API, as they appear in the OpenAPI document."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: one line naming the problem, and a stable machine-readable code."""

    error: str = Field(examples=["scan.pdf: not an image (accepted: JPEG, PNG, TIFF, BMP, WEBP)"])
    code: str = Field(examples=["not_an_image"])


class RLE(BaseModel):
    """COCO uncompressed RLE: column-major runs, starting with a background run."""

    size: list[int] = Field(description="[height, width]")
    counts: list[int]


class SegmentResult(BaseModel):
    name: str = Field(description="Upload file name ('request body' for raw uploads).")
    width: int
    height: int
    threshold: float
    area_pixels: int
    area_fraction: float = Field(description="Mask pixels / image pixels.")
    mean_confidence: float = Field(description="Mean probability inside the mask; 0 when the mask is empty.")
    mask_format: str
    mask_png_base64: str | None = Field(None, description="8-bit grayscale PNG, 0 or 255, at the input's size.")
    mask_rle: RLE | None = None
    probability_png_base64: str | None = Field(
        None, description="8-bit PNG of round(p * 255) (include_probability=true)."
    )
    probability_f32_base64: str | None = Field(
        None,
        description=(
            "The exact probabilities (include_probability=true&probability_format=float32): row-major "
            "little-endian float32, base64; probability >= threshold, compared in float32, is the mask."
        ),
    )
    uncertainty_png_base64: str | None = Field(
        None, description="Ensembles only: 8-bit PNG of round(min(2 * std, 1) * 255), std across the fold models."
    )
    mean_uncertainty: float | None = Field(
        None, description="Ensembles only: mean per-pixel std across the fold models."
    )
    image_jpeg_base64: str | None = Field(None, description="The decoded input as JPEG (include_image=true).")
    mask_name: str | None = Field(
        None, description="File name of the ground-truth mask, when one was sent as field 'mask'."
    )
    dice: float | None = Field(
        None,
        description=(
            "With a ground-truth mask: Dice of the predicted mask and the ground truth (1 when both are empty)."
        ),
    )
    iou: float | None = Field(
        None, description="With a ground-truth mask: intersection over union (1 when both are empty)."
    )
    truth_area_pixels: int | None = Field(None, description="With a ground-truth mask: its polyp pixels.")
    n_models: int
    seconds: float


class ExplainResult(BaseModel):
    name: str
    width: int
    height: int
    threshold: float = Field(
        description="Threshold of the served mask whose logits are explained (the same mask /v1/segment answers)."
    )
    heatmap_bits: int
    heatmap_png_base64: str = Field(description="Grayscale PNG (8- or 16-bit) of the heatmap in [0, 1], maximum = 1.")
    heatmap_max: float = Field(description="0 when the served mask is empty at this threshold (nothing to explain).")
    mask_area_pixels: int = Field(description="Pixels of the explained (served) mask at the input's size.")
    overlay_png_base64: str | None = Field(
        None, description="RGB PNG: the heatmap in `colormap` colours blended 50 % over the image."
    )
    colormap: str | None = Field(None, description="Colours of the overlay.")
    layer: str
    method: str
    target: str
    models: list[int] = Field(description="Indices (folds) of the models whose heatmaps are averaged.")
    model_index: int | None = Field(
        None, description="The explained model when only one is; absent when several are averaged."
    )
    combine: str | None = Field(None, description="How several models' heatmaps are combined; absent for one model.")
    seconds: float


ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Corrupt or truncated image, empty upload, no file in the upload, or a ground-truth mask of another size",
        401: "Token missing or wrong (only when the server has a token)",
        413: "Upload over the size limit, or image over the pixel limit",
        415: "Not an image (or, on /v1/segment-video, not a video)",
        422: "Invalid query parameter",
        503: "Queue full or timed out: retry after the Retry-After header's seconds",
    }.items()
}
