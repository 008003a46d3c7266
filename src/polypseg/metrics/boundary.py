"""Boundary F1 of binary masks: the contour F-measure (Csurka et al., BMVC 2013; DAVIS, Perazzi et al. 2016).

A mask pixel is a boundary pixel when one of its 4-neighbours is outside the mask. The frame edge
is not a boundary: a polyp cut by the frame has no contour there. Precision is the share of
predicted boundary pixels within ``tolerance`` pixels (Euclidean) of a ground-truth boundary pixel,
recall the converse, and F1 = 2PR / (P + R), per image. Two empty masks score 1, like Dice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# 2 px at 256 px = 0.8% of the side, close to DAVIS's 0.008 x diagonal.
REFERENCE_TOLERANCE = 2
REFERENCE_SIZE = 256


def default_tolerance(size: int) -> int:
    """Tolerance in pixels for ``size``-pixel masks: 2 at 256 px, scaled linearly, at least 1."""
    return max(1, round(REFERENCE_TOLERANCE * size / REFERENCE_SIZE))


def _as_batch(masks: Any) -> torch.Tensor:
    tensor = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks))
    tensor = tensor.detach().cpu().bool()
    return tensor[None] if tensor.dim() == 2 else tensor


def boundary_map(masks: Any) -> torch.Tensor:
    """Boundary pixels ``bool (N, H, W)`` of masks ``(N, H, W)`` or ``(H, W)``."""
    m = _as_batch(masks)
    # replicate padding: pixels beyond the frame copy the edge, so the edge itself is no boundary
    p = F.pad(m[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0] > 0.5
    interior = p[:, 1:-1, 1:-1] & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    return m & ~interior


def _dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return masks
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).float()[None, None]
    return F.conv2d(masks[:, None].float(), disk, padding=radius)[:, 0] > 0.5


def boundary_scores(
    pred: Any, target: Any, tolerance: int = REFERENCE_TOLERANCE, chunk: int = 64
) -> dict[str, np.ndarray]:
    """Per-image boundary ``precision``, ``recall`` and ``f1`` (float64 ``(N,)``) of binary masks ``(N, H, W)``."""
    p_all, t_all = _as_batch(pred), _as_batch(target)
    if p_all.shape != t_all.shape:
        raise ValueError(f"prediction {tuple(p_all.shape)} and target {tuple(t_all.shape)} differ in shape")
    precision, recall, f1 = [], [], []
    for start in range(0, p_all.shape[0], chunk):
        p, t = p_all[start : start + chunk], t_all[start : start + chunk]
        pb, tb = boundary_map(p), boundary_map(t)
        n_p = pb.flatten(1).sum(1).double()
        n_t = tb.flatten(1).sum(1).double()
        hit_p = (pb & _dilate(tb, tolerance)).flatten(1).sum(1).double()
        hit_t = (tb & _dilate(pb, tolerance)).flatten(1).sum(1).double()
        prec = torch.where(n_p > 0, hit_p / n_p.clamp(min=1), torch.nan)
        rec = torch.where(n_t > 0, hit_t / n_t.clamp(min=1), torch.nan)
        both = prec + rec
        f = torch.where(both > 0, 2 * prec * rec / both.clamp(min=1e-12), torch.zeros_like(both))
        # A mask without boundary pixels is empty or fills the frame: then only its emptiness matters.
        no_boundary = (n_p == 0) & (n_t == 0)
        same_fill = p.flatten(1).any(1) == t.flatten(1).any(1)
        f = torch.where(no_boundary, same_fill.double(), f)
        f = torch.where((n_p == 0) ^ (n_t == 0), torch.zeros_like(f), f)
        precision.append(prec)
        recall.append(rec)
        f1.append(f)
    return {
        "precision": torch.cat(precision).numpy(),
        "recall": torch.cat(recall).numpy(),
        "f1": torch.cat(f1).numpy(),
    }


def boundary_f1(pred: Any, target: Any, tolerance: int = REFERENCE_TOLERANCE) -> np.ndarray | float:
    """Boundary F1 per image: float64 ``(N,)`` for ``(N, H, W)`` masks, a float for one ``(H, W)`` mask."""
    scores = boundary_scores(pred, target, tolerance)["f1"]
    single = (pred.dim() if isinstance(pred, torch.Tensor) else np.ndim(pred)) == 2
    return float(scores[0]) if single else scores
