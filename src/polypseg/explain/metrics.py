"""Quantitative checks of heatmaps against ground truth and against the model itself.

Conventions (definitions and sources in docs/explainability.md):

* All functions take one map ``(H, W)`` (returning a float) or a batch ``(N, H, W)`` (returning a
  float64 array ``(N,)``), as numpy arrays or tensors; heatmaps are non-negative.
* Ground-truth metrics are NaN for an image with an empty ground-truth mask (there is no polyp to
  point at) or an all-zero heatmap (there is no explanation); :func:`explanation_report` leaves
  NaN out of the mean and reports how many images were counted.
* Ties between equal heatmap values (plateaus, all-zero regions) are broken by a fixed
  pseudo-random order, so the result never depends on raster order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polypseg.errors import PolypsegError
from polypseg.inference.inferer import batch_slices, model_logits

DEFAULT_TOPK = 0.15  # mean polyp area of Kvasir-SEG is 15.4% of the frame
DEFAULT_DELETION_STEPS = 16
METRIC_KEYS = ("dice", "energy_inside", "pointing_game", "topk_iou", "deletion_auc", "insertion_auc")
# What each number means and on which scale, for tables, summaries and galleries.
METRIC_SCALES = {
    "dice": "overlap of the predicted and true masks, 0..1 (needs ground truth)",
    "iou": "intersection over union of the predicted and true masks, 0..1 (needs ground truth)",
    "energy_inside": "share of the heatmap's total inside the true mask, 0..1 (needs ground truth)",
    "pointing_game": "1 if the heatmap's peak falls inside the true mask, else 0 (needs ground truth)",
    "topk_iou": "IoU of the most salient pixels (top-k share) with the true mask, 0..1 (needs ground truth)",
    "deletion_auc": (
        "area under the model's mean confidence inside its own mask, relative to the whole image's (1 = unchanged), "
        "as the most salient pixels are removed; 0..1 as a rule, lower is better"
    ),
    "insertion_auc": (
        "the same as pixels are revealed on a blurred image, relative to the whole image's confidence; higher is "
        "better; can exceed 1 when a partly revealed image scores higher than the whole one (not clipped)"
    ),
}
_TIE_SEED = 0


class ExplainMetricsError(PolypsegError):
    """Bad input to an explanation metric (shapes, k, steps)."""


def _tensor(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(values))  # flipped/strided views are fine too


def _batch(heatmap: Any, gt_mask: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    h, g = _tensor(heatmap).float(), _tensor(gt_mask).bool()
    single = h.dim() == 2
    if single:
        h, g = h[None], g[None]
    if h.dim() != 3 or h.shape != g.shape:
        raise ExplainMetricsError(
            f"heatmap {tuple(h.shape)} and mask {tuple(g.shape)} must both be (H, W) or (N, H, W)"
        )
    return h, g, single


def _result(values: torch.Tensor, single: bool) -> float | np.ndarray:
    array = values.double().numpy()
    return float(array[0]) if single else array


def _undefined(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    flat_h = h.reshape(h.shape[0], -1)
    return ~g.reshape(g.shape[0], -1).any(1) | ~(flat_h > 0).any(1)


def energy_inside(heatmap: Any, gt_mask: Any) -> float | np.ndarray:
    """Share of the heatmap's mass inside the ground-truth mask: ``sum(h * gt) / sum(h)``."""
    h, g, single = _batch(heatmap, gt_mask)
    h = h.clamp(min=0).double()
    inside = (h * g).reshape(h.shape[0], -1).sum(1)
    total = h.reshape(h.shape[0], -1).sum(1)
    values = torch.where(_undefined(h, g), torch.nan, inside / total.clamp(min=1e-300))
    return _result(values, single)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).float()[None, None]
    grown = F.conv2d(mask[:, None].float(), disk, padding=radius)
    return grown[:, 0] > 0


def pointing_game(heatmap: Any, gt_mask: Any, tolerance: int = 0) -> float | np.ndarray:
    """1.0 if the heatmap's maximum lies inside the ground truth (grown by ``tolerance`` pixels), else 0.0.

    Where the maximum is reached at several pixels, one inside the mask is enough.
    NaN for an empty ground truth or an all-zero heatmap.
    """
    h, g, single = _batch(heatmap, gt_mask)
    region = _dilate(g, tolerance)
    flat = h.reshape(h.shape[0], -1)
    peak = flat.amax(1, keepdim=True)
    hit = ((flat >= peak) & region.reshape(region.shape[0], -1)).any(1).double()
    values = torch.where(_undefined(h, g), torch.nan, hit)
    return _result(values, single)


def salience_ranks(heatmaps: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel ``(N, H*W)``, 0 = most salient; ties in a fixed pseudo-random order."""
    flat = heatmaps.reshape(heatmaps.shape[0], -1).float()
    generator = torch.Generator().manual_seed(_TIE_SEED)
    perm = torch.randperm(flat.shape[1], generator=generator).to(flat.device)
    order = perm[torch.argsort(-flat[:, perm], dim=1, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order).contiguous())
    return ranks


def topk_iou(heatmap: Any, gt_mask: Any, k: float = DEFAULT_TOPK) -> float | np.ndarray:
    """IoU between the ground truth and the ``k`` share (default 15%) of most salient pixels."""
    if not 0 < k <= 1:
        raise ExplainMetricsError(f"top-k share must be in (0, 1], got {k}")
    h, g, single = _batch(heatmap, gt_mask)
    count = max(1, round(k * h[0].numel()))
    top = salience_ranks(h) < count
    truth = g.reshape(g.shape[0], -1)
    intersection = (top & truth).sum(1).double()
    union = (top | truth).sum(1).double()
    values = torch.where(_undefined(h, g), torch.nan, intersection / union.clamp(min=1))
    return _result(values, single)


# ---------------------------------------------------------------------------------------------
# Deletion / insertion (Petsiuk et al. 2018, RISE)

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PredictedMaskProbability:
    """Mean foreground probability inside the mask the model predicted on the original image.

    ``score(logits, reference_logits) -> (M,)``; NaN where the original prediction is empty.
    """

    threshold: float = 0.5

    def __call__(self, logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
        mask = (torch.sigmoid(reference_logits.float()) >= self.threshold).float()
        area = mask.reshape(mask.shape[0], -1).sum(1)
        inside = (torch.sigmoid(logits.float()) * mask).reshape(mask.shape[0], -1).sum(1)
        return torch.where(area > 0, inside / area.clamp(min=1), torch.nan)


def gaussian_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Depthwise Gaussian blur with reflect padding (RISE's insertion substrate: 11 px, sigma 5)."""
    radius = kernel_size // 2
    x = torch.arange(kernel_size, dtype=torch.float32, device=images.device) - radius
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _baseline(images: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mean":  # zero in ImageNet-normalised space is the ImageNet mean colour
        return torch.zeros_like(images)
    if kind == "blur":
        return gaussian_blur(images)
    raise ExplainMetricsError(f"unknown baseline '{kind}'; use 'mean' or 'blur'")


@torch.inference_mode()
def deletion_insertion_auc(
    model: nn.Module,
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    score_fn: ScoreFn | None = None,
    steps: int = DEFAULT_DELETION_STEPS,
    batch_size: int = 32,
    reference_logits: torch.Tensor | None = None,
    deletion_baseline: str = "mean",
    insertion_baseline: str = "blur",
    precision: str = "auto",
) -> dict[str, np.ndarray]:
    """Deletion and insertion curves and their areas for normalised images ``(N, 3, H, W)``.

    Pixels are removed (deletion: replaced by ``deletion_baseline``) or revealed (insertion:
    starting from ``insertion_baseline``) in order of decreasing heatmap value, in ``steps`` equal
    shares. At each step the score (default :class:`PredictedMaskProbability` at 0.5) is divided by
    the original image's score; AUC is the trapezoid area over the share in [0, 1]. A good
    explanation has a low deletion and a high insertion AUC. All ``2 * steps`` perturbed inputs of
    all images go through the model in batches of ``batch_size``.

    Returns ``{"deletion_auc", "insertion_auc": (N,), "deletion_curve", "insertion_curve":
    (N, steps + 1), "fractions": (steps + 1,)}``; NaN rows where the original score is 0 or NaN.
    """
    if steps < 1:
        raise ExplainMetricsError(f"deletion steps must be >= 1, got {steps}")
    single = images.dim() == 3
    if single:
        images, heatmaps = images[None], heatmaps[None]
    if heatmaps.shape[0] != images.shape[0] or heatmaps.shape[-2:] != images.shape[-2:]:
        raise ExplainMetricsError(f"heatmaps {tuple(heatmaps.shape)} do not match images {tuple(images.shape)}")
    score_fn = score_fn or PredictedMaskProbability()
    device = images.device
    n, _, height, width = images.shape
    pixels = height * width
    if reference_logits is None:
        reference_logits = torch.cat(
            [model_logits(model, images[batch], precision) for batch in batch_slices(n, batch_size)]
        )
    reference_logits = reference_logits.to(device).float()
    original = score_fn(reference_logits, reference_logits)

    ranks = salience_ranks(heatmaps.to(device)).view(n, 1, height, width)
    deletion_base = _baseline(images, deletion_baseline)
    insertion_base = _baseline(images, insertion_baseline)
    counts = torch.round(torch.linspace(0, 1, steps + 1, device=device) * pixels).long()
    # Deletion step 0 and insertion step `steps` are the original image: their score is known.
    image_idx = torch.arange(n, device=device).repeat_interleave(2 * steps)
    is_deletion = torch.tensor([True] * steps + [False] * steps, device=device).repeat(n)
    step = torch.cat([torch.arange(1, steps + 1), torch.arange(0, steps)]).to(device).repeat(n)
    scores = torch.empty(image_idx.numel(), device=device)
    for sl in batch_slices(image_idx.numel(), batch_size):
        idx, deleting = image_idx[sl], is_deletion[sl].view(-1, 1, 1, 1)
        salient = ranks[idx] < counts[step[sl]].view(-1, 1, 1, 1)
        keep_image = torch.where(deleting, ~salient, salient)
        base = torch.where(deleting, deletion_base[idx], insertion_base[idx])
        x = torch.where(keep_image, images[idx], base)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        scores[sl] = score_fn(model_logits(model, x, precision), reference_logits[idx])
    relative = (scores.view(n, 2, steps) / original.view(n, 1, 1)).cpu().double()
    valid = (original > 0).cpu() & torch.isfinite(original).cpu()
    ones = torch.ones(n, 1, dtype=torch.float64)
    deletion_curve = torch.cat([ones, relative[:, 0]], dim=1).numpy()
    insertion_curve = torch.cat([relative[:, 1], ones], dim=1).numpy()
    deletion_curve[~valid.numpy()] = np.nan
    insertion_curve[~valid.numpy()] = np.nan
    fractions = np.linspace(0.0, 1.0, steps + 1)
    result = {
        "deletion_auc": np.trapezoid(deletion_curve, fractions, axis=1),
        "insertion_auc": np.trapezoid(insertion_curve, fractions, axis=1),
        "deletion_curve": deletion_curve,
        "insertion_curve": insertion_curve,
        "fractions": fractions,
    }
    if single:  # one (3, H, W) image: its values, not arrays of one
        for key in ("deletion_auc", "insertion_auc", "deletion_curve", "insertion_curve"):
            result[key] = result[key][0]
    return result


# ---------------------------------------------------------------------------------------------
# Per-image records and summaries


def score_explanations(
    model: nn.Module,
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    logits: torch.Tensor,
    *,
    gt_masks: torch.Tensor | np.ndarray | None = None,
    threshold: float = 0.5,
    topk: float = DEFAULT_TOPK,
    deletion_steps: int = DEFAULT_DELETION_STEPS,
    batch_size: int = 32,
    precision: str = "auto",
    logits_from_model: bool = True,
) -> list[dict[str, float]]:
    """All explanation metrics for one batch at model resolution, one dict per image.

    ``images`` normalised ``(N, 3, S, S)``, ``heatmaps (N, S, S)``, ``logits (N, 1, S, S)`` from
    the Grad-CAM forward pass, ``gt_masks`` bool ``(N, S, S)`` or None (ground-truth metrics NaN).
    ``deletion_steps=0`` skips deletion/insertion (NaN). ``logits_from_model=False`` (the logits
    came from another engine): the curves' reference is recomputed with ``model`` at ``precision``,
    so the original and the perturbed scores come from the same computation.
    """
    n = images.shape[0]
    heat = heatmaps.detach().float().cpu()
    records: list[dict[str, float]] = [{} for _ in range(n)]
    if gt_masks is not None:
        gt = _tensor(gt_masks).bool()
        columns = {
            "energy_inside": energy_inside(heat, gt),
            "pointing_game": pointing_game(heat, gt),
            "topk_iou": topk_iou(heat, gt, topk),
        }
    else:
        columns = {name: np.full(n, np.nan) for name in ("energy_inside", "pointing_game", "topk_iou")}
    if deletion_steps > 0:
        curves = deletion_insertion_auc(
            model,
            images,
            heatmaps.detach(),
            PredictedMaskProbability(threshold),
            steps=deletion_steps,
            batch_size=batch_size,
            reference_logits=logits.detach() if logits_from_model else None,
            precision=precision,
        )
        columns["deletion_auc"] = curves["deletion_auc"]
        columns["insertion_auc"] = curves["insertion_auc"]
    else:
        columns["deletion_auc"] = columns["insertion_auc"] = np.full(n, np.nan)
    for name, values in columns.items():
        for record, value in zip(records, np.asarray(values, dtype=np.float64), strict=False):
            record[name] = float(value)
    return records


def explanation_report(per_image: Iterable[dict[str, Any]], keys: Sequence[str] = METRIC_KEYS) -> dict[str, Any]:
    """``{"per_image": [...], "mean_std": {metric: {"mean", "std", "n"}}}``; NaN values are left out (``n`` counts the rest)."""
    from polypseg.metrics.segmentation import mean_std

    records = [dict(r) for r in per_image]
    summary: dict[str, dict[str, float | int]] = {}
    for key in keys:
        values = [float(r[key]) for r in records if key in r and r[key] is not None and np.isfinite(float(r[key]))]
        if not any(key in r for r in records):
            continue
        mean, std = mean_std(values)
        summary[key] = {"mean": mean, "std": std, "n": len(values)}
    return {"per_image": records, "mean_std": summary}


def evaluate_explanations(
    model: nn.Module,
    images: np.ndarray,
    gt_masks: np.ndarray,
    threshold: float = 0.5,
    layer: str = "decoder.final",
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    deletion_steps: int = 10,
    topk: float = DEFAULT_TOPK,
    stems: Sequence[str] | None = None,
    method: str = "gradcam",
    progress: bool = False,
    precision: str = "auto",
) -> dict[str, Any]:
    """Grad-CAM every image and measure it: the explanation part of a CV fold's summary.

    ``images`` ``uint8 (N, S, S, 3)`` already at the model's input size, ``gt_masks`` bool
    ``(N, S, S)``. ``model`` must be on ``device`` in eval mode. Each record holds ``stem``,
    ``dice`` (at threshold, model resolution) and the metrics of :func:`score_explanations`.
    Returns :func:`explanation_report`'s dict plus ``"settings"``. Cost per image: one
    forward+backward, plus ``2 * deletion_steps`` forwards (``deletion_steps=0`` skips them).
    """
    from polypseg.explain.gradcam import GradCAMDriver, MaskedLogitSum
    from polypseg.metrics.segmentation import dice_score

    images = np.asarray(images)
    gt_masks = np.asarray(gt_masks).astype(bool)
    if images.ndim != 4 or images.shape[-1] != 3 or gt_masks.shape != images.shape[:3]:
        raise ExplainMetricsError(f"images {images.shape} must be (N, S, S, 3) and masks {gt_masks.shape} (N, S, S)")
    n = images.shape[0]
    stems = list(stems) if stems is not None else [str(i) for i in range(n)]
    if len(stems) != n:
        raise ExplainMetricsError(f"{len(stems)} stems for {n} images")
    records: list[dict[str, Any]] = []
    driver = GradCAMDriver(model, layer, method, device=device, precision=precision, batch_size=batch_size)
    with driver:
        for cams in driver.batches(images, MaskedLogitSum(threshold), "explaining" if progress else None):
            gt = torch.from_numpy(gt_masks[cams.indices])
            dice = dice_score((cams.probabilities >= threshold).cpu(), gt).numpy()
            scored = score_explanations(
                model,
                cams.inputs,
                cams.heatmaps,
                cams.logits,
                gt_masks=gt,
                threshold=threshold,
                topk=topk,
                deletion_steps=deletion_steps,
                batch_size=batch_size,  # the memory bound of every pass, deletion/insertion included
                precision=precision,
            )
            for stem, d, record in zip(stems[cams.indices], dice, scored, strict=False):
                records.append({"stem": stem, "dice": float(d), **record})
    report = explanation_report(records)
    report["settings"] = {
        "layer": layer if isinstance(layer, str) else type(layer).__name__,
        "method": method,
        "target": f"sum of logits inside the predicted mask (threshold {threshold:g})",
        "threshold": threshold,
        "topk": topk,
        "deletion_steps": deletion_steps,
        "deletion_baseline": "mean",
        "insertion_baseline": "blur",
        "resolution": int(images.shape[1]),
    }
    return report
