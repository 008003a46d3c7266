"""Inference speed: warm-up, many timed repetitions, median latency and images per second.

Two pipelines are timed, both through :class:`polypseg.inference.Predictor` (the code ``predict``
runs): ``model`` (a normalised batch already on the device -> probabilities on the device) and
``end-to-end`` (``uint8`` images at the model's input size on the host -> upload, normalise,
model, sigmoid -> probabilities back on the host). Each repetition is timed on its own, with a CUDA
synchronisation before the clock stops, so the median is a latency, not a pipelined average.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polypseg.config import RunConfig
from polypseg.errors import PolypsegError
from polypseg.inference import Predictor

PIPELINES = ("model", "end-to-end")
BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")


class BenchError(PolypsegError):
    """A benchmark option does not fit the model or the machine."""


def device_name(device: str | torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` or ``AMD EPYC (2 cores)``: what the numbers were measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def _precision(predictor: Predictor) -> str:
    if predictor.backend == "onnxruntime":
        return "int8" if predictor.metadata.get("quantization") else "fp32"
    return "bf16" if predictor.device.type == "cuda" else "fp32"


def benchmark(
    target: Predictor | nn.Module,
    batch_size: int = 1,
    image_size: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
    mode: str | None = None,
    pipeline: str = "model",
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``target`` (a Predictor, or a logits model wrapped in one) on random images.

    ``mode`` (for a model): ``eager``, or a ``torch.compile`` mode such as ``reduce-overhead``
    (CUDA graphs). Returns ``median_ms``, ``p90_ms``, ``images_per_s`` (batch / median),
    ``device_name``, ``backend``, ``batch_size`` and the other settings.
    """
    if pipeline not in PIPELINES:
        raise BenchError(f"unknown pipeline '{pipeline}'; choose one of: {', '.join(PIPELINES)}")
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise BenchError("batch_size and repeats must be >= 1, warmup >= 0")
    if isinstance(target, Predictor):
        predictor = target
        if mode not in (None, "eager" if predictor.compile_mode is None else predictor.compile_mode):
            raise BenchError(f"mode '{mode}' differs from the predictor's ({predictor.compile_mode or 'eager'})")
        if image_size not in (None, predictor.image_size):
            raise BenchError(f"image_size {image_size} differs from the model's input size {predictor.image_size}")
    else:
        predictor = Predictor.from_model(
            target, image_size=image_size or 256, device=device, batch_size=batch_size, compile=mode or False
        )
    size = predictor.image_size
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    cuda = predictor.device.type == "cuda"
    if pipeline == "model":
        batch = predictor._upload(images)

        def step() -> None:
            predictor.predict_tensor(batch)
    else:

        def step() -> None:
            predictor.predict_resized(images)

    saved_batch_size, predictor.batch_size = predictor.batch_size, batch_size
    times = []
    try:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize(predictor.device)
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(predictor.device)
            times.append(time.perf_counter() - start)
    finally:
        predictor.batch_size = saved_batch_size
    times_ms = np.array(times) * 1000
    median = float(statistics.median(times_ms))
    return {
        "backend": predictor.backend,
        "precision": _precision(predictor),
        "mode": predictor.compile_mode or "eager",
        "pipeline": pipeline,
        "device": str(predictor.device),
        "device_name": device_name(predictor.device),
        "threads": torch.get_num_threads() if predictor.backend == "torch" else (os.cpu_count() or 1),
        "batch_size": batch_size,
        "image_size": size,
        "models": predictor.n_models,
        "warmup": warmup,
        "repeats": repeats,
        "median_ms": median,
        "p90_ms": float(np.percentile(times_ms, 90)),
        "mean_ms": float(times_ms.mean()),
        "min_ms": float(times_ms.min()),
        "images_per_s": batch_size / (median / 1000),
    }


def random_checkpoint(folder: Path | str, image_size: int = 256, seed: int = 0) -> Path:
    """Save the default architecture (U-Net, ResNet-34) with random weights, for pure speed tests."""
    from polypseg.checkpoint import save_checkpoint
    from polypseg.models import create_model

    torch.manual_seed(seed)
    config = RunConfig()
    config.train.image_size = image_size
    return save_checkpoint(Path(folder) / "random", create_model(config.model).eval(), config, extra={"note": "random weights"})


def load_for_bench(
    model: str | Path,
    backend: str,
    device: str = "auto",
    compile: str | None = None,
    image_size: int = 256,
    calibration: Path | str | None = None,
    workdir: Path | str | None = None,
) -> Predictor:
    """A predictor for ``polypseg bench``: ``model`` is a checkpoint, a run folder, an ``.onnx`` or ``random``.

    ``onnxruntime-int8`` uses ``NAME.int8.onnx`` when present, else quantizes into ``workdir``,
    calibrated on ``calibration`` (default: the bundled Kvasir-SEG sample).
    """
    from polypseg.export import cached_onnx, int8_path_for, quantize_onnx_int8

    if backend not in BACKENDS:
        raise BenchError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}, all")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="polypseg-bench-"))
    if str(model) == "random":
        model = random_checkpoint(workdir, image_size)
    model = Path(model)
    if backend == "torch":
        return Predictor.from_checkpoint(model, device=device, backend="torch", compile=compile or False)
    if compile:
        raise BenchError(f"--compile applies to the torch backend, not {backend}")
    if backend == "onnxruntime" or model.suffix == ".onnx":
        return Predictor.from_checkpoint(model, device=device, backend="onnxruntime")
    from polypseg.checkpoint import find_checkpoints

    int8_paths = []
    for checkpoint in find_checkpoints(model):
        int8 = int8_path_for(checkpoint)
        if not int8.is_file():
            if calibration is None:
                from polypseg.sample_data import sample_dataset_path

                calibration = sample_dataset_path()
            int8 = quantize_onnx_int8(
                cached_onnx(checkpoint), workdir / f"{checkpoint.parent.name}-{checkpoint.stem}.int8.onnx", calibration
            )
        int8_paths.append(int8)
    return Predictor.from_onnx(int8_paths, device=device)


def benchmark_training(
    config: RunConfig,
    device: str = "auto",
    steps: int = 30,
    warmup: int = 5,
    train_images: int = 800,
) -> dict[str, Any]:
    """Training throughput of a recipe: :class:`polypseg.training.TrainStep` on random data on the device.

    Unlike inference latency, training is a pipelined loop (the host queues steps ahead of the GPU),
    so ``steps`` consecutive steps are timed together with one synchronisation at the end.
    ``first_step_s`` (the first warm-up step) includes ``torch.compile``'s compilation when the
    recipe compiles. ``epoch_s`` and ``run_minutes`` extrapolate to ``train_images`` images per
    epoch and the recipe's epochs (training only: no validation, evaluation or Grad-CAM checks).
    """
    from polypseg.devices import resolve_device
    from polypseg.training import DistributedContext, TrainStep, seed_everything

    if steps < 1 or warmup < 1:
        raise BenchError("steps and warmup must be >= 1 (the first warm-up step is timed on its own)")
    torch_device = resolve_device(device)
    tc = config.train
    seed_everything(tc.seed)
    step = TrainStep(config, torch_device)
    step.wrap(DistributedContext())  # one process; torch.compile if the recipe asks
    generator = torch.Generator(device=torch_device).manual_seed(tc.seed)
    b, s = tc.batch_size, tc.image_size
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=torch_device, generator=generator)
    masks = (torch.rand((b, 1, s, s), device=torch_device, generator=generator) > 0.7).to(torch.uint8)

    def sync() -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)

    start = time.perf_counter()
    step(images, masks, tc.lr, generator)
    sync()
    first_step_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step(images, masks, tc.lr, generator)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(images, masks, tc.lr, generator)
    sync()
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise BenchError(f"the training loss became {float(loss)}: the timing would not be of real training")
    per_step = elapsed / steps
    steps_per_epoch = max(1, train_images // tc.batch_size)
    return {
        "recipe": tc.recipe,
        "device": str(torch_device),
        "device_name": device_name(torch_device),
        "precision": "bf16" if torch_device.type == "cuda" and tc.amp else "fp32",
        "compile": bool(tc.compile and torch_device.type == "cuda"),
        "batch_size": tc.batch_size,
        "image_size": tc.image_size,
        "ema": tc.ema_decay > 0,
        "warmup": warmup,
        "steps": steps,
        "first_step_s": first_step_s,
        "step_ms": per_step * 1000,
        "images_per_s": tc.batch_size / per_step,
        "train_images": train_images,
        "epoch_s": steps_per_epoch * per_step,
        "epochs": tc.epochs,
        "run_minutes": steps_per_epoch * per_step * tc.epochs / 60,
    }


def training_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`benchmark_training` results."""
    lines = [
        "| setting | device | precision | compile | batch | EMA | step ms | images/s | first step s | epoch s | training min (epochs) |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('label') or r['recipe']} | {r['device_name']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['batch_size']} | "
            f"{'yes' if r['ema'] else 'no'} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {r['first_step_s']:.1f} | "
            f"{r['epoch_s']:.1f} | {r['run_minutes']:.1f} ({r['epochs']}) |"
        )
    return "\n".join(lines)
