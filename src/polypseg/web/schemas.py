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
    probability_png_base64: str | None = Field(None, description="8-bit PNG of round(p * 255) (include_probability=true).")
    uncertainty_png_base64: str | None = Field(
        None, description="Ensembles only: 8-bit PNG of round(min(2 * std, 1) * 255), std across the fold models."
    )
    mean_uncertainty: float | None = Field(None, description="Ensembles only: mean per-pixel std across the fold models.")
    image_jpeg_base64: str | None = Field(None, description="The decoded input as JPEG (include_image=true).")
    n_models: int
    seconds: float


class ExplainResult(BaseModel):
    name: str
    width: int
    height: int
    threshold: float = Field(description="Threshold of the predicted mask whose logits are explained.")
    heatmap_bits: int
    heatmap_png_base64: str = Field(description="Grayscale PNG (8- or 16-bit) of the heatmap in [0, 1], maximum = 1.")
    heatmap_max: float = Field(description="0 when the predicted mask is empty (nothing to explain).")
    overlay_png_base64: str | None = Field(None, description="RGB PNG: jet heatmap blended 50 % over the image.")
    layer: str
    method: str
    target: str
    model_index: int = Field(description="Which model of an ensemble is explained (fold 0).")
    seconds: float


ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Corrupt or truncated image, or no file in the upload",
        401: "Token missing or wrong (only when the server has a token)",
        413: "Upload over the size limit, or image over the pixel limit",
        415: "Not an image",
        422: "Invalid query parameter",
        503: "Queue full or timed out: retry after the Retry-After header's seconds",
    }.items()
}
