"""Grad-CAM heatmaps/s on the CPU: PyTorch (backward pass) against forward-only engines.

Side by side in one process, interleaved batch by batch (so load from other work on a shared
machine falls on every engine alike): torch fp32 and torch bf16 (SegmentationGradCAM, bf16
autocast + channels-last as polypseg.experiments.bench.benchmark_gradcam runs it), and EngineGradCAM on
onnxruntime fp32, OpenVINO fp32 and OpenVINO bf16 (with --int8 also onnxruntime/OpenVINO int8,
calibrated on the benchmark images). Prints heatmaps/s, speed-up over torch fp32 and the mean
per-image Pearson correlation of each engine's heatmaps with torch fp32's.

    PYTHONPATH=src python benchmarks/engine_gradcam_speed.py                 # 200 heatmaps, random weights
    PYTHONPATH=src python benchmarks/engine_gradcam_speed.py -n 1000 --model CKPT --int8

Default model: the paper's U-Net/ResNet-34 (random weights, head bias centred so the predicted
mask covers about half of the images); images: the bundled Kvasir-SEG sample, cycled.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from polypseg.core.precision import autocast, cpu_bf16_flags
from polypseg.data.transforms import preprocess
from polypseg.explain.engine_gradcam import EngineGradCAM
from polypseg.explain.gradcam import MaskedLogitSum, SegmentationGradCAM

HeatmapFn = Callable[[torch.Tensor], torch.Tensor]


def load_model(checkpoint: str | None, image_size: int, images: torch.Tensor) -> tuple[nn.Module, float, str]:
    """The model, its threshold and a description; random weights get their head bias centred."""
    if checkpoint:
        from polypseg.models.checkpoint import load_checkpoint

        loaded = load_checkpoint(checkpoint, device="cpu")
        return loaded.model.eval(), float(loaded.threshold), f"{checkpoint} (threshold {loaded.threshold:.2f})"
    from polypseg.models.factory import create_model

    torch.manual_seed(0)
    model = create_model().eval()
    with torch.no_grad():
        model.segmentation_head[0].bias -= model(images[:8]).median()
    return model, 0.5, "U-Net/ResNet-34, random weights (head bias centred)"


def read_images(folder: Path, image_size: int) -> tuple[torch.Tensor, list[Path]]:
    from polypseg.inference.export import collect_images
    from polypseg.inference.predictor import load_input

    paths = collect_images(folder)
    return preprocess([load_input(path)[0] for path in paths], image_size), paths


def torch_heatmaps(model: nn.Module, precision: str, threshold: float) -> HeatmapFn:
    local = copy.deepcopy(model).eval()
    channels_last = precision == "bf16"
    if channels_last:
        local = local.to(memory_format=torch.channels_last)
    cam = SegmentationGradCAM(local)

    def run(batch: torch.Tensor) -> torch.Tensor:
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast("cpu", precision):
            return cam(batch, MaskedLogitSum(threshold)).float()  # type: ignore[union-attr]

    return run


def engine_heatmaps(cam: EngineGradCAM, threshold: float) -> HeatmapFn:
    return lambda batch: cam(batch, MaskedLogitSum(threshold))  # type: ignore[return-value]


def correlations(reference: torch.Tensor, other: torch.Tensor) -> list[float]:
    """Pearson correlation per image, over images where both heatmaps are not all zero."""
    return [
        float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])
        for a, b in zip(reference, other, strict=False)
        if a.max() > 0 and b.max() > 0
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="heatmaps per engine (default 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--model", help="a polypseg checkpoint (default: the paper's U-Net/ResNet-34, random weights)")
    parser.add_argument("--images", type=Path, help="a folder of images (default: the bundled Kvasir-SEG sample)")
    parser.add_argument("--int8", action="store_true", help="also onnxruntime/OpenVINO int8, calibrated on the images")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for every engine (default: each engine's own)"
    )
    args = parser.parse_args()

    from polypseg.data.sample_data import sample_dataset_path

    if args.threads:
        torch.set_num_threads(args.threads)
    pool, paths = read_images(args.images or sample_dataset_path() / "images", args.image_size)
    model, threshold, description = load_model(args.model, args.image_size, pool)
    bf16 = bool(cpu_bf16_flags())

    print(
        f"model: {description}; {args.n} heatmaps at {args.image_size} px, batch {args.batch_size}; "
        f"{len(paths)} images cycled; torch threads {torch.get_num_threads()}; CPU bf16 flags: {', '.join(cpu_bf16_flags()) or 'none'}"
    )
    started = time.perf_counter()
    runners: dict[str, HeatmapFn] = {"torch fp32": torch_heatmaps(model, "fp32", threshold)}
    if bf16:
        runners["torch bf16"] = torch_heatmaps(model, "bf16", threshold)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="polypseg-bench-") as tmp:
        onnx_path = Path(tmp) / "gradcam.onnx"
        common = {"image_size": args.image_size, "onnx_path": onnx_path, "threads": args.threads}
        runners["onnxruntime fp32"] = engine_heatmaps(EngineGradCAM(model, "onnxruntime", "fp32", **common), threshold)
        reuse = {**common, "export": False}
        runners["openvino fp32"] = engine_heatmaps(EngineGradCAM(model, "openvino", "fp32", **reuse), threshold)
        if bf16:
            runners["openvino bf16"] = engine_heatmaps(EngineGradCAM(model, "openvino", "bf16", **reuse), threshold)
        if args.int8:
            int8 = {**reuse, "calibration_images": paths}
            runners["onnxruntime int8"] = engine_heatmaps(
                EngineGradCAM(model, "onnxruntime", "int8", **int8), threshold
            )
            runners["openvino int8"] = engine_heatmaps(
                EngineGradCAM(model, "openvino", "int8", **{**reuse, "onnx_path": onnx_path.with_suffix(".int8.onnx")}),
                threshold,
            )
    print(f"setup (export, compile, quantize): {time.perf_counter() - started:.1f} s")

    index = torch.arange(args.n) % len(pool)
    first = pool[index[: args.batch_size]]
    for run in runners.values():
        run(first)  # warm-up
    seconds = dict.fromkeys(runners, 0.0)
    scores: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for step, begin in enumerate(range(0, args.n, args.batch_size)):
        batch = pool[index[begin : begin + args.batch_size]].contiguous()
        maps: dict[str, torch.Tensor] = {}
        for name in names[step % len(names) :] + names[: step % len(names)]:  # rotate who goes first
            tick = time.perf_counter()
            maps[name] = runners[name](batch)
            seconds[name] += time.perf_counter() - tick
        for name in names:
            scores[name] += correlations(maps["torch fp32"], maps[name])

    print()
    print(
        "| engine | heatmaps | seconds | heatmaps/s | vs torch fp32 | correlation with torch fp32 (mean, min) | images compared |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        values = scores[name]
        corr = f"{np.mean(values):.4f}, {np.min(values):.4f}" if values else "n/a"
        print(
            f"| {name} | {args.n} | {seconds[name]:.1f} | {args.n / seconds[name]:.2f} | "
            f"{seconds['torch fp32'] / seconds[name]:.2f}x | {corr} | {len(values)} |"
        )


if __name__ == "__main__":
    main()
