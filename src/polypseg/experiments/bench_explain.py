"""``polypseg bench-explain``: Grad-CAM speed per precision and engine, and how close each one's heatmaps are to fp32's."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from polypseg.core.devices import device_name
from polypseg.experiments.bench import cpu_feature_summary


def benchmark_gradcam(
    model: nn.Module,
    *,
    n: int = 1000,
    batch_size: int = 16,
    device: str = "auto",
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    image_size: int = 256,
    images: np.ndarray | None = None,
    compare: int = 32,
    seed: int = 0,
    engines: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Grad-CAM throughput per precision, and how far each precision's heatmaps are from fp32's.

    ``engines`` adds forward-only rows (:class:`polypseg.explain.engine_gradcam.EngineGradCAM`) on the same
    images: ``onnxruntime``, ``onnxruntime-int8``, ``openvino``, ``openvino-bf16``, ``openvino-int8``
    (int8 calibrated on the first 64 images of the pool); their correlation is with torch fp32.

    The paper's Grad-CAM (logits inside the predicted mask, final decoder block), one forward and
    backward pass per batch of ``batch_size``, on ``n`` images: ``images`` (``uint8 (N, S, S, 3)``,
    cycled) or random ones. Each precision is warmed up first. ``heatmap_correlation`` is the mean
    Pearson correlation with the fp32 heatmaps over the first ``compare`` images whose fp32 mask is
    not empty (``None`` without fp32 or without such an image).
    """
    from polypseg.core.devices import resolve_device
    from polypseg.explain.gradcam import MaskedLogitSum

    torch_device = resolve_device(device)
    if images is None:
        images = np.random.default_rng(seed).integers(0, 256, (min(n, 64), image_size, image_size, 3), dtype=np.uint8)
    pool = np.ascontiguousarray(images)
    index = np.arange(n) % pool.shape[0]
    target = MaskedLogitSum(0.5)

    rows, kept = [], {}
    for precision in [*precisions, *engines]:
        if precision in engines:
            rows.append(_time_engine_gradcam(model, precision, pool, index, n, batch_size, target, compare, kept))
        else:
            rows.append(_time_torch_gradcam(model, precision, torch_device, pool, index, batch_size, compare, kept))
    _compare_with_fp32(rows, kept)
    return rows


def _time_torch_gradcam(
    model: nn.Module,
    precision: str,
    device: torch.device,
    pool: np.ndarray,
    index: np.ndarray,
    batch_size: int,
    compare: int,
    kept: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """One :func:`benchmark_gradcam` row for torch in ``precision``; its first ``compare`` maps go into ``kept``."""
    import copy

    from polypseg.core.precision import resolve_precision
    from polypseg.explain.gradcam import GradCAMDriver, MaskedLogitSum
    from polypseg.inference.inferer import batch_slices, use_precision_layout

    n, target = len(index), MaskedLogitSum(0.5)
    chosen = resolve_precision(precision, device)
    local = copy.deepcopy(model).eval().to(device)
    channels_last = use_precision_layout(local, device, chosen)
    with GradCAMDriver(local, device=device, precision=chosen, batch_size=batch_size) as driver:
        driver.run(pool[index[: min(n, batch_size)]], target)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        checksum = 0.0
        first: list[torch.Tensor] = []
        for batch in batch_slices(n, batch_size):  # the driver's loop, without n images held at once
            maps = driver.run(pool[index[batch]], target, batch).heatmaps.float()
            checksum += float(maps.sum())  # completes every batch
            if batch.start < compare:
                first.append(maps[: max(0, compare - batch.start)].cpu())
        seconds = time.perf_counter() - start
    kept[chosen] = torch.cat(first)
    return {"engine": "torch", **_speed_fields(chosen, channels_last, device, n, batch_size, pool, seconds)}


def _compare_with_fp32(rows: list[dict[str, Any]], kept: dict[str, torch.Tensor]) -> None:
    """Add each row's heatmap correlation with torch fp32 and its speed-up over it (when fp32 was timed)."""
    reference = kept.get("fp32")
    for row in rows:
        row["heatmap_correlation"] = None
        if reference is None:
            continue
        other = kept[row.get("key", row["precision"])]
        # Only fp32's empty maps are left out (nothing to agree with); a precision that loses the
        # prediction fp32 made (an empty or flat map) counts as correlation 0 against it.
        values = [
            _correlation(reference[i].flatten().numpy(), other[i].flatten().numpy())
            for i in range(min(len(reference), len(other)))
            if reference[i].max() > 0
        ]
        row["heatmap_correlation"] = float(np.mean(values)) if values else None
        row["images_compared"] = len(values)
    if reference is not None:
        fp32_seconds = next(r["seconds"] for r in rows if r["precision"] == "fp32" and r["engine"] == "torch")
        for row in rows:
            row["speedup_vs_fp32"] = fp32_seconds / row["seconds"]


def _correlation(reference: np.ndarray, other: np.ndarray) -> float:
    """Pearson correlation; 0 when either map is flat (all zero), where it is undefined."""
    if float(reference.std()) == 0 or float(other.std()) == 0:
        return 0.0
    return float(np.corrcoef(reference, other)[0, 1])


def _time_engine_gradcam(
    model: nn.Module,
    spec: str,
    pool: np.ndarray,
    index: np.ndarray,
    n: int,
    batch_size: int,
    target: Any,
    compare: int,
    kept: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """One :func:`benchmark_gradcam` row for a forward-only engine (``openvino-bf16`` and so on), on the CPU."""
    import copy

    from polypseg.explain.engine_gradcam import EngineGradCAM
    from polypseg.inference.inferer import batch_slices, model_input

    engine, _, precision = spec.partition("-")
    precision = precision or "fp32"
    calibration = list(pool[:64]) if precision == "int8" else None
    local = copy.deepcopy(model).float().eval().cpu()
    cpu = torch.device("cpu")
    with EngineGradCAM(local, engine, precision, image_size=int(pool.shape[1]), calibration_images=calibration) as cam:
        cam(model_input(pool[index[: min(n, batch_size)]], cpu, "fp32"), target)  # warm-up
        start = time.perf_counter()
        first: list[torch.Tensor] = []
        checksum = 0.0
        for batch in batch_slices(n, batch_size):
            maps = cam(model_input(pool[index[batch]], cpu, "fp32"), target)
            checksum += float(maps.sum())
            if batch.start < compare:
                first.append(maps[: max(0, compare - batch.start)])
        seconds = time.perf_counter() - start
        chosen = cam.precision
    kept[spec] = torch.cat(first)
    return {"engine": engine, "key": spec, **_speed_fields(chosen, False, cpu, n, batch_size, pool, seconds)}


def _speed_fields(
    precision: str,
    channels_last: bool,
    device: torch.device,
    n: int,
    batch_size: int,
    pool: torch.Tensor,
    seconds: float,
) -> dict[str, Any]:
    """The fields every Grad-CAM speed row has after its engine: precision, machine, sizes, speed."""
    return {
        "precision": precision,
        "channels_last": channels_last,
        "device_name": device_name(device),
        "cpu_flags": cpu_feature_summary() if device.type == "cpu" else "",
        "n": n,
        "batch_size": batch_size,
        "image_size": int(pool.shape[1]),
        "seconds": seconds,
        "heatmaps_per_s": n / seconds,
        "threads": torch.get_num_threads(),
    }


def gradcam_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`benchmark_gradcam` results."""
    lines = [
        "| device | engine | precision | layout | heatmaps | batch | seconds | heatmaps/s | vs torch fp32 | correlation with torch fp32 |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        corr = "n/a" if r["heatmap_correlation"] is None else f"{r['heatmap_correlation']:.4f}"
        lines.append(
            f"| {r['device_name']} | {r.get('engine', 'torch')} | {r['precision']} | {'channels-last' if r['channels_last'] else 'NCHW'} | {r['n']} | "
            f"{r['batch_size']} | {r['seconds']:.1f} | {r['heatmaps_per_s']:.1f} | {r.get('speedup_vs_fp32', float('nan')):.2f}x | {corr} |"
        )
    return "\n".join(lines)
