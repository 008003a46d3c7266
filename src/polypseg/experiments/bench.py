"""Inference speed: warm-up, many timed repetitions, median latency and images per second.

Two pipelines are timed, both through :class:`polypseg.inference.predictor.Predictor` (the code ``predict``
runs): ``model`` (a normalised batch already on the device -> probabilities on the device) and
``end-to-end`` (``uint8`` images at the model's input size on the host -> upload, normalise,
model, sigmoid -> probabilities back on the host). Each repetition is timed on its own, with a CUDA
synchronisation before the clock stops, so the median is a latency, not a pipelined average.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polypseg.core.config import RunConfig
from polypseg.core.devices import device_name
from polypseg.errors import PolypsegError
from polypseg.inference.predictor import Predictor

PIPELINES = ("model", "end-to-end")
# name -> (engine, precision): "bf16" rows are offered where the CPU computes bf16 natively.
BACKEND_SPECS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "fp32"),
    "torch-bf16": ("torch", "bf16"),
    "onnxruntime": ("onnxruntime", "fp32"),
    "onnxruntime-int8": ("onnxruntime", "int8"),
    "openvino": ("openvino", "fp32"),
    "openvino-bf16": ("openvino", "bf16"),
    "openvino-int8": ("openvino", "int8"),
}
BACKENDS = tuple(BACKEND_SPECS)


def auto_backend(device: str | torch.device = "cpu", model: str | Path | None = None) -> str:
    """The engine ``polypseg predict --backend auto`` uses: torch on CUDA; on a CPU OpenVINO when
    installed, else onnxruntime, in int8 where every checkpoint of ``model`` has a validated int8
    export (beside it or in the cache), else OpenVINO in bf16 where the CPU has it natively."""
    from importlib.util import find_spec

    from polypseg.core.precision import cpu_bf16_flags

    if torch.device(device).type == "cuda":
        return "torch"
    engine = "openvino" if find_spec("openvino") is not None else "onnxruntime"
    if model is not None and str(model) != "random" and Path(model).suffix != ".onnx" and _all_int8_validated(model):
        return f"{engine}-int8"
    if engine == "onnxruntime":
        return "onnxruntime"
    return "openvino-bf16" if cpu_bf16_flags() else "openvino"


def _all_int8_validated(model: str | Path) -> bool:
    from polypseg.inference.export import find_validated_int8
    from polypseg.models.checkpoint import CheckpointError, find_checkpoints
    from polypseg.models.pretrained import resolve_model

    try:
        checkpoints = find_checkpoints(resolve_model(model))
    except CheckpointError:
        return False  # load_for_bench names the problem
    return bool(checkpoints) and all(find_validated_int8(c) is not None for c in checkpoints)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """What ``--backend all`` runs: on CUDA torch; on a CPU every engine installed, bf16 where native."""
    from importlib.util import find_spec

    from polypseg.core.precision import cpu_bf16_flags

    if torch.device(device).type == "cuda":
        return ["torch", "torch-bf16"]
    names = []
    for name, (engine, precision) in BACKEND_SPECS.items():
        if engine == "openvino" and find_spec("openvino") is None:
            continue
        if precision == "bf16" and not cpu_bf16_flags():
            continue
        names.append(name)
    return names


class BenchError(PolypsegError):
    """A benchmark option does not fit the model or the machine."""


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
    return {
        "backend": predictor.backend,
        "precision": predictor.precision,
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
        **_latency_stats(times_ms, batch_size),
        "times_ms": [float(t) for t in times_ms],
    }


def _latency_stats(times_ms: np.ndarray, batch_size: int) -> dict[str, float]:
    median = float(statistics.median(times_ms))
    return {
        "median_ms": median,
        # the fastest tenth: what a quiet machine gives where a shared one's speed drifts
        "p10_ms": float(np.percentile(times_ms, 10)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "mean_ms": float(times_ms.mean()),
        "min_ms": float(times_ms.min()),
        "images_per_s": batch_size / (median / 1000),
    }


def random_checkpoint(folder: Path | str, image_size: int = 256, seed: int = 0) -> Path:
    """Save the default architecture (U-Net, ResNet-34) with random weights, for pure speed tests."""
    from polypseg.models.checkpoint import save_checkpoint
    from polypseg.models.factory import create_model

    torch.manual_seed(seed)
    config = RunConfig()
    config.train.image_size = image_size
    return save_checkpoint(
        Path(folder) / "random", create_model(config.model).eval(), config, extra={"note": "random weights"}
    )


def load_for_bench(
    model: str | Path,
    backend: str,
    device: str = "auto",
    compile: str | None = None,
    image_size: int = 256,
    calibration: Path | str | None = None,
    workdir: Path | str | None = None,
) -> Predictor:
    """A predictor for ``polypseg bench``: ``model`` is a checkpoint, a run folder, an ``.onnx``, a
    shipped model's name or ``random``.

    ``backend`` is a name of :data:`BACKEND_SPECS`. The int8 ones use the validated int8 model that
    ``backend="auto"`` would (beside the checkpoint or in the cache), else ``NAME.int8.onnx`` when
    present, else quantize into ``workdir``, calibrated on ``calibration`` (default: the bundled
    Kvasir-SEG sample); ``openvino-int8`` runs that same int8 ONNX graph in OpenVINO.
    """
    from polypseg.inference.export import (
        cached_onnx,
        find_validated_int8,
        int8_path_for,
        quantize_onnx_int8,
        read_onnx_metadata,
    )

    if backend not in BACKENDS:
        raise BenchError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}, all")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="polypseg-bench-"))
    cache_dir: Path | None = None
    if str(model) == "random":
        # One random model per workdir, exported into the workdir: a throwaway model must not add
        # a new 100 MB export to the user's cache for every backend of every run.
        existing = workdir / "random.safetensors"
        model = existing if existing.is_file() else random_checkpoint(workdir, image_size)
        cache_dir = workdir
    else:
        from polypseg.models.pretrained import resolve_model

        model = resolve_model(model)  # every backend takes a shipped model's name, not only torch's
    model = Path(model)
    engine, precision = BACKEND_SPECS[backend]
    if engine == "torch":
        return Predictor.from_checkpoint(
            model, device=device, backend="torch", compile=compile or False, precision=precision
        )
    if compile:
        raise BenchError(f"--compile applies to the torch backend, not {backend}")
    if precision == "int8" and model.suffix == ".onnx" and "quantization" not in read_onnx_metadata(model):
        raise BenchError(
            f"--backend {backend}: {model.name} is not a quantized model; give a checkpoint (quantized here) or NAME.int8.onnx"
        )
    if precision != "int8" or model.suffix == ".onnx":
        if model.suffix == ".onnx" and precision == "int8":
            precision = "auto"  # a quantized graph runs as it is
        return Predictor.from_checkpoint(model, device=device, backend=engine, precision=precision, cache_dir=cache_dir)
    from polypseg.models.checkpoint import find_checkpoints

    int8_paths = []
    for checkpoint in find_checkpoints(model):
        int8 = find_validated_int8(checkpoint, cache_dir) or int8_path_for(checkpoint)
        if not int8.is_file():
            if calibration is None:
                from polypseg.data.sample_data import sample_dataset_path

                calibration = sample_dataset_path()
            int8 = quantize_onnx_int8(
                cached_onnx(checkpoint, cache_dir),
                workdir / f"{checkpoint.parent.name}-{checkpoint.stem}.int8.onnx",
                calibration,
            )
        int8_paths.append(int8)
    if engine == "openvino":
        return Predictor.from_openvino(int8_paths)
    return Predictor.from_onnx(int8_paths, device=device)


# bench-train's variants: (precision, channels-last, torch.compile). "recipe" is the recipe as it
# would train here (polypseg.core.precision's rule).
TRAIN_VARIANTS: dict[str, tuple[str, bool | None, bool]] = {
    "recipe": ("", None, False),
    "fp32-nchw": ("fp32", False, False),
    "fp32-cl": ("fp32", True, False),
    "bf16-cl": ("bf16", True, False),
    "bf16-cl-compiled": ("bf16", True, True),
}
CPU_VARIANTS = ("fp32-nchw", "fp32-cl", "bf16-cl")
# A round is "steady" when the matmul probes on both sides of it read at least this share of the
# machine's best: on a shared host another tenant's matrix-unit work can halve bf16 throughput for
# seconds at a time (docs/benchmarks.md, "Why this machine drifts").
STEADY_FRACTION = 0.8


def forward_flops(config: RunConfig, image_size: int | None = None) -> float:
    """FLOPs (2 per multiply-add) of one image's forward pass, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from polypseg.models.factory import create_model

    size = image_size or config.train.image_size
    model = create_model(config.model).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 20, device: str = "cpu") -> float:
    """This machine's square-matmul throughput in FLOP/s (best of ``repeats``): the roofline the model is measured against."""
    torch_device = torch.device(device)
    a = torch.randn(n, n, device=torch_device).to(dtype)
    b = torch.randn(n, n, device=torch_device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        start = time.perf_counter()
        torch.mm(a, b)
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def is_steady(probes: Sequence[float], peak: float, fraction: float = STEADY_FRACTION) -> bool:
    """Whether every probe around a timing read at least ``fraction`` of ``peak``: it ran in the fast phase."""
    return min(probes) >= fraction * peak


def steady_rounds(probes: Sequence[float], peak: float, fraction: float = STEADY_FRACTION) -> list[int]:
    """The rounds (round ``r`` lies between ``probes[r]`` and ``probes[r + 1]``) that ran in the fast phase."""
    return [r for r in range(len(probes) - 1) if is_steady(probes[r : r + 2], peak, fraction)]


def speed_probe() -> float:
    """A quick two-thread bf16 matmul peak in TFLOP/s (best of 3 at 2048): which phase a shared CPU is in now."""
    return matmul_peak(torch.bfloat16, repeats=3) / 1e12


class _TimedStep:
    """One variant's TrainStep on fixed random data, timed in rounds (so variants can interleave)."""

    def __init__(self, config: RunConfig, device: torch.device, variant: str, size: int | None = None) -> None:
        from polypseg.training.loop import DistributedContext, TrainStep, seed_everything

        if variant not in TRAIN_VARIANTS:
            raise BenchError(f"unknown variant '{variant}'; choose from {', '.join(TRAIN_VARIANTS)}")
        precision, channels_last, compile_ = TRAIN_VARIANTS[variant]
        config = RunConfig.from_dict(config.to_dict())
        tc = config.train
        if precision:
            tc.precision = precision
        seed_everything(tc.seed)
        self.step = TrainStep(config, device, channels_last=channels_last)
        self.step.wrap(DistributedContext())  # one process; torch.compile on CUDA if the recipe asks
        self.compiled = bool(tc.compile and device.type == "cuda")
        if compile_ and not self.compiled:
            self.step.forward_model = torch.compile(self.step.forward_model)
            self.compiled = True
        self.device, self.tc, self.size, self.variant = device, tc, size, variant
        self.generator = torch.Generator(device=device).manual_seed(tc.seed)
        b, s = tc.batch_size, tc.image_size
        self.images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device, generator=self.generator)
        self.masks = (torch.rand((b, 1, s, s), device=device, generator=self.generator) > 0.7).to(torch.uint8)
        self.times: list[float] = []
        self.first_step_s = float("nan")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int, timed: bool = True) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step(self.images, self.masks, self.tc.lr, self.generator, size=self.size)
        self._sync()
        if not torch.isfinite(loss):
            raise BenchError(f"the training loss became {float(loss)}: the timing would not be of real training")
        if timed:
            self.times.append((time.perf_counter() - start) / steps)

    def warm_up(self, warmup: int) -> None:
        start = time.perf_counter()
        self.run(1, timed=False)
        self.first_step_s = time.perf_counter() - start
        if warmup > 1:
            self.run(warmup - 1, timed=False)


def benchmark_training(
    config: RunConfig,
    device: str = "auto",
    steps: int = 30,
    warmup: int = 5,
    train_images: int = 800,
    variants: tuple[str, ...] = ("recipe",),
    rounds: int = 1,
    peak: bool = False,
) -> list[dict[str, Any]]:
    """Training throughput of a recipe: :class:`polypseg.training.loop.TrainStep` on random data on the device.

    Training is a pipelined loop (the host queues steps ahead of the GPU), so ``steps`` consecutive
    steps are timed together with one synchronisation at the end; with several ``variants`` (see
    :data:`TRAIN_VARIANTS`) each round times every variant in turn, so a load change hits them
    alike, and the median round counts; ``speedup_vs_first`` is the median over rounds of the first
    variant's step time over this one's in the same round (paired, so it holds on a machine whose
    speed drifts, as shared cloud CPUs do). ``first_step_s`` includes ``torch.compile``'s compilation.
    ``epoch_s`` and ``run_minutes`` extrapolate to ``train_images`` images per epoch and the
    recipe's epochs (training only), timing the progressive-resizing size too when the recipe has
    one. Each row has the model's achieved TFLOP/s (3x the counted forward FLOPs per image) and,
    with ``peak``, that as a fraction of this machine's measured bf16 matmul peak. With ``peak`` on
    a CPU a quick bf16 matmul probe also runs before the first round and after each: ``round_probe_tflops``,
    ``steady_rounds`` (see :func:`steady_rounds`; the peak is the best of the probes and of the
    full measurement) and, when there are any, ``steady_step_ms`` and ``steady_speedup_vs_first``,
    the same medians over the steady rounds only.
    """
    from polypseg.core.devices import resolve_device
    from polypseg.training.loop import epoch_size

    if steps < 1 or warmup < 1 or rounds < 1:
        raise BenchError("steps, warmup and rounds must be >= 1 (the first warm-up step is timed on its own)")
    torch_device = resolve_device(device)
    tc = config.train
    low = tc.progressive_size if tc.progressive_size and tc.progressive_epochs else None
    timers: list[tuple[_TimedStep, _TimedStep | None]] = []
    for variant in variants:
        main = _TimedStep(config, torch_device, variant)
        small = _TimedStep(config, torch_device, variant, size=low) if low else None
        main.warm_up(warmup)
        if small:
            small.warm_up(warmup)
        timers.append((main, small))
    probing = peak and torch_device.type == "cpu"
    probes = [speed_probe()] if probing else []
    for _ in range(rounds):
        for main, small in timers:
            main.run(steps)
            if small:
                small.run(steps)
        if probing:
            probes.append(speed_probe())
    flops = {size: 3 * forward_flops(config, size) for size in {tc.image_size, low or tc.image_size}}
    # in TFLOP/s, as the probes and bench's rows
    peak_bf16 = max(matmul_peak(torch.bfloat16, device=str(torch_device)) / 1e12, *probes) if peak else None
    peak_fp32 = matmul_peak(torch.float32, device=str(torch_device)) / 1e12 if peak else None
    steady = steady_rounds(probes, peak_bf16) if peak_bf16 else []
    steps_per_epoch = max(1, train_images // tc.batch_size)
    rows = []
    first = timers[0][0]
    for main, small in timers:
        per_step = statistics.median(main.times)
        small_step = statistics.median(small.times) if small else per_step
        epoch_seconds = [steps_per_epoch * (small_step if epoch_size(tc, e) else per_step) for e in range(tc.epochs)]
        achieved = flops[tc.image_size] * tc.batch_size / per_step
        row = {
            "recipe": tc.recipe,
            "variant": main.variant,
            "device": str(torch_device),
            "device_name": device_name(torch_device),
            "cpu_flags": cpu_feature_summary() if torch_device.type == "cpu" else "",
            "precision": main.step.precision,
            "channels_last": main.step.channels_last,
            "compile": main.compiled,
            "batch_size": tc.batch_size,
            "image_size": tc.image_size,
            "ema": tc.ema_decay > 0,
            "warmup": warmup,
            "steps": steps,
            "rounds": rounds,
            "first_step_s": main.first_step_s,
            "step_ms": per_step * 1000,
            "round_step_ms": [t * 1000 for t in main.times],
            "speedup_vs_first": statistics.median([a / b for a, b in zip(first.times, main.times, strict=True)]),
            "first_variant": first.variant,
            "images_per_s": tc.batch_size / per_step,
            "train_gflop_per_image": flops[tc.image_size] / 1e9,
            "achieved_tflops": achieved / 1e12,
            "train_images": train_images,
            "epoch_s": steps_per_epoch * per_step,
            "epochs": tc.epochs,
            "run_minutes": sum(epoch_seconds) / 60,
        }
        if small:
            row.update(
                {
                    "progressive_size": low,
                    "progressive_step_ms": small_step * 1000,
                    "progressive_epochs": tc.progressive_epochs,
                }
            )
        if peak_bf16:
            row.update(
                {
                    "matmul_peak_bf16_tflops": peak_bf16,
                    "matmul_peak_fp32_tflops": peak_fp32,
                    "fraction_of_bf16_peak": achieved / 1e12 / peak_bf16,
                    "round_probe_tflops": probes,
                    "steady_rounds": steady,
                }
            )
        if steady:
            row["steady_step_ms"] = statistics.median(main.times[r] for r in steady) * 1000
            row["steady_speedup_vs_first"] = statistics.median(first.times[r] / main.times[r] for r in steady)
        rows.append(row)
    return rows


def training_breakdown(
    config: RunConfig,
    device: str = "auto",
    steps: int = 5,
    warmup: int = 2,
    train_images: int = 800,
    val_images: int = 100,
) -> dict[str, Any]:
    """Where an epoch's time goes: the step's phases, validation and the checkpoint writes.

    The step's phases (augment, forward, backward, optimizer, EMA) are timed inside the real
    :class:`polypseg.training.loop.TrainStep` (with a device sync at each boundary on CUDA, so only use
    this to see proportions); validation is ``val_images`` through the evaluation path; the writes
    are one training state and one best checkpoint into a temporary folder. Returns seconds per
    epoch for each part and their shares.
    """
    from polypseg.core.devices import resolve_device
    from polypseg.models.checkpoint import save_checkpoint, save_training_state
    from polypseg.training.evaluation import predict_probabilities

    torch_device = resolve_device(device)
    tc = config.train
    timer = _TimedStep(config, torch_device, "recipe")
    timer.warm_up(warmup)
    timer.step.phase_times = {}
    timer.run(steps)
    steps_per_epoch = max(1, train_images // tc.batch_size)
    parts = {phase: statistics.median(times) * steps_per_epoch for phase, times in timer.step.phase_times.items()}
    timer.step.phase_times = None
    images = np.random.default_rng(0).integers(
        0, 256, (min(val_images, 2 * tc.eval_batch_size), tc.image_size, tc.image_size, 3), dtype=np.uint8
    )
    model = timer.step.eval_model
    predict_probabilities(
        model, images[: tc.eval_batch_size], device=torch_device, batch_size=tc.eval_batch_size, precision=tc.precision
    )
    start = time.perf_counter()
    predict_probabilities(model, images, device=torch_device, batch_size=tc.eval_batch_size, precision=tc.precision)
    parts["validation"] = (time.perf_counter() - start) * val_images / len(images) if tc.val_fraction > 0 else 0.0
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        save_training_state(
            Path(folder) / "last_state",
            timer.step.model,
            timer.step.optimizer,
            {"epoch": 1, "history": []},
            ema_model=timer.step.ema,
        )
        save_checkpoint(Path(folder) / "best", model, config)
        parts["checkpoint writes"] = time.perf_counter() - start
    total = sum(parts.values())
    return {
        "recipe": tc.recipe,
        "device_name": device_name(torch_device),
        "precision": timer.step.precision,
        "channels_last": timer.step.channels_last,
        "train_images": train_images,
        "val_images": val_images,
        "epoch_s": total,
        "seconds": parts,
        "shares": {k: v / total for k, v in parts.items()},
        "threads": torch.get_num_threads(),
    }


def breakdown_markdown(result: dict[str, Any]) -> str:
    lines = ["| part of an epoch | seconds | share |", "|---|---:|---:|"]
    for part, seconds in result["seconds"].items():
        lines.append(f"| {part} | {seconds:.1f} | {100 * result['shares'][part]:.1f}% |")
    lines.append(f"| **total** | **{result['epoch_s']:.1f}** | 100% |")
    return "\n".join(lines)


def benchmark_gradcam(
    model: nn.Module,
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
    import copy

    from polypseg.core.devices import resolve_device
    from polypseg.core.precision import resolve_precision
    from polypseg.explain.gradcam import GradCAMDriver, MaskedLogitSum
    from polypseg.inference.inferer import batch_slices, use_precision_layout

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
            continue
        chosen = resolve_precision(precision, torch_device)
        local = copy.deepcopy(model).eval().to(torch_device)
        channels_last = use_precision_layout(local, torch_device, chosen)
        with GradCAMDriver(local, device=torch_device, precision=chosen, batch_size=batch_size) as driver:
            driver.run(pool[index[: min(n, batch_size)]], target)  # warm-up
            if torch_device.type == "cuda":
                torch.cuda.synchronize(torch_device)
            start = time.perf_counter()
            checksum = 0.0
            first: list[torch.Tensor] = []
            for batch in batch_slices(n, batch_size):  # the driver's loop, without n images held at once
                maps = driver.run(pool[index[batch]], target, batch).heatmaps.float()
                checksum += float(maps.sum())  # completes every batch
                begin = batch.start
                if begin < compare:
                    first.append(maps[: max(0, compare - begin)].cpu())
            seconds = time.perf_counter() - start
        kept[chosen] = torch.cat(first)
        rows.append(
            {
                "engine": "torch",
                "precision": chosen,
                "channels_last": channels_last,
                "device_name": device_name(torch_device),
                "cpu_flags": cpu_feature_summary() if torch_device.type == "cpu" else "",
                "n": n,
                "batch_size": batch_size,
                "image_size": int(pool.shape[1]),
                "seconds": seconds,
                "heatmaps_per_s": n / seconds,
                "threads": torch.get_num_threads(),
            }
        )
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
    return rows


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
    return {
        "engine": engine,
        "key": spec,
        "precision": chosen,
        "channels_last": False,
        "device_name": device_name(cpu),
        "cpu_flags": cpu_feature_summary(),
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


def cpu_feature_summary() -> str:
    """The CPU flags that decide polypseg's speed: AVX-512, its bf16/VNNI extensions, AMX."""
    from polypseg.core.precision import cpu_flags

    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
    return " ".join(flag for flag in wanted if flag in cpu_flags())


def drifted(row: dict[str, Any]) -> bool:
    """Whether a benchmark row's matmul probes show the machine's speed changing between rounds."""
    probes = row.get("round_probe_tflops") or []
    return bool(probes) and min(probes) < STEADY_FRACTION * row["matmul_peak_bf16_tflops"]


def shows_steady_columns(rows: list[dict[str, Any]], key: str) -> bool:
    """Whether a table of paired rows adds their steady-round figures: the probes drifted and every row has ``key``."""
    return drifted(rows[0]) and all(key in row for row in rows)


def drift_warning(row: dict[str, Any]) -> str:
    """The line ``bench-train`` and ``bench`` print when a row has :func:`drifted`."""
    probes = row["round_probe_tflops"]
    return (
        f"this machine's bf16 matmul speed changed between rounds ({min(probes):.2f}-{max(probes):.2f} TFLOP/s: a "
        f"shared or throttled CPU), so the absolute figures mix its phases; {len(row['steady_rounds'])} of "
        f"{row['rounds']} rounds ran with it at >= {STEADY_FRACTION:.0%} of its best"
    )


def training_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`benchmark_training` results (with TFLOP/s and the peak fraction when measured)."""
    with_peak = any("fraction_of_bf16_peak" in r for r in rows)
    paired = len(rows) > 1 and all("speedup_vs_first" in r for r in rows)
    steady = paired and shows_steady_columns(rows, "steady_step_ms")
    head = "| setting | device | precision | layout | compile | batch | EMA | step ms | images/s | TFLOP/s |"
    rule = "|---|---|---|---|---|---:|---|---:|---:|---:|"
    if paired:
        head += f" vs {rows[0]['variant']} (paired rounds) |"
        rule += "---:|"
    if steady:
        head += f" steady rounds ({len(rows[0]['steady_rounds'])} of {rows[0]['rounds']}): step ms, vs {rows[0]['variant']} |"
        rule += "---:|"
    if with_peak:
        head += " of bf16 peak |"
        rule += "---:|"
    head += " first step s | epoch s | training min (epochs) |"
    rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        label = r.get("label") or r["recipe"]
        if r.get("variant", "recipe") != "recipe":
            label = f"{label} {r['variant']}"
        line = (
            f"| {label} | {r['device_name']} | {r['precision']} | {'channels-last' if r.get('channels_last') else 'NCHW'} | "
            f"{'yes' if r['compile'] else 'no'} | {r['batch_size']} | {'yes' if r['ema'] else 'no'} | {r['step_ms']:.1f} | "
            f"{r['images_per_s']:.1f} | {r.get('achieved_tflops', float('nan')):.2f} |"
        )
        if paired:
            line += f" {r['speedup_vs_first']:.2f}x |"
        if steady:
            line += f" {r['steady_step_ms']:.1f}, {r['steady_speedup_vs_first']:.2f}x |"
        if with_peak:
            line += f" {100 * r.get('fraction_of_bf16_peak', float('nan')):.0f}% |"
        line += f" {r['first_step_s']:.1f} | {r['epoch_s']:.1f} | {r['run_minutes']:.1f} ({r['epochs']}) |"
        lines.append(line)
    return "\n".join(lines)


def benchmark_backends(
    model: str | Path,
    batch_size: int = 1,
    backend: str = "auto",
    device: str = "auto",
    compile: str = "none",
    compare_eager: bool = False,
    repeats: int = 50,
    warmup: int = 10,
    image_size: int = 256,
    pipeline: str = "both",
    calibration: Path | None = None,
    step: Callable[[str], None] = lambda message: None,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """``polypseg bench``: time one backend, ``all`` installed ones or ``auto``'s, per pipeline; one row each.

    With ``compile`` the torch backends are timed compiled (and eager too with ``compare_eager``).
    ``step`` hears what is being loaded and timed (for a transient status line). With ``rounds`` > 1
    every setting is loaded first (each warms up just before its first timing), then each round
    times ``repeats / rounds`` repetitions of every setting in turn, so a machine whose speed
    drifts (shared cloud CPUs) slows them alike; each row's ``speedup_vs_first`` is then the median over rounds of the first
    setting's round median over its own (same pipeline), paired like ``bench-train``'s. On a CPU a
    quick bf16 matmul probe also runs before the first round and after each (``round_probe_tflops``, ``steady_rounds``:
    see :func:`steady_rounds`), and ``steady_median_ms``, ``steady_images_per_s`` and
    ``steady_speedup_vs_first`` give the same figures over the steady rounds only.
    """
    if rounds < 1 or rounds > repeats:
        raise BenchError(f"--rounds {rounds}: must be between 1 and --repeats ({repeats})")
    from polypseg.core.devices import resolve_device

    torch_device = resolve_device(device, label="--device")
    if backend == "auto":
        backends = [auto_backend(torch_device, model)]
    elif backend == "all":
        backends = available_backends(torch_device)
    elif backend in BACKENDS:
        backends = [backend]
    else:
        raise BenchError(f"--backend {backend}: choose auto, all, {', '.join(BACKENDS)}")
    pipelines = list(PIPELINES) if pipeline == "both" else [pipeline]
    if pipeline != "both" and pipeline not in PIPELINES:
        raise BenchError(f"--pipeline {pipeline}: choose both, {', '.join(PIPELINES)}")
    compile_mode = None if compile in ("none", "eager") else compile
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="polypseg-bench-") as workdir:
        runs = []
        for name in backends:
            if name.startswith("torch"):
                if compile_mode is None or compare_eager:
                    runs.append((name, None))
                if compile_mode is not None:
                    runs.append((name, compile_mode))
            else:
                runs.append((name, None))
        if rounds == 1:  # one setting loaded at a time: the least memory
            for name, mode in runs:
                predictor = _load_step(step, model, name, mode, torch_device, image_size, calibration, workdir)
                for pipe in pipelines:
                    step(f"timing {name} {mode or 'eager'} {pipe}, batch {batch_size}")
                    row = benchmark(predictor, batch_size=batch_size, warmup=warmup, repeats=repeats, pipeline=pipe)
                    row["backend"] = name
                    rows.append(row)
            return rows
        loaded = [
            (name, _load_step(step, model, name, mode, torch_device, image_size, calibration, workdir))
            for name, mode in runs
        ]
        settings = [(name, predictor, pipe) for name, predictor in loaded for pipe in pipelines]
        per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
        timed: list[list[dict[str, Any]]] = [[] for _ in settings]
        # On a CPU, whose speed a shared host can change under the measurement, probe it between rounds.
        probing = torch_device.type == "cpu"
        probes = [speed_probe()] if probing else []
        for r, count in enumerate(per_round):
            for (name, predictor, pipe), done in zip(settings, timed, strict=True):
                step(f"round {r + 1}/{rounds}: timing {name} {pipe}, batch {batch_size}")
                first_round = not done
                done.append(
                    benchmark(
                        predictor,
                        batch_size=batch_size,
                        warmup=warmup if first_round else 0,
                        repeats=count,
                        pipeline=pipe,
                    )
                )
            if probing:
                probes.append(speed_probe())
        peak = max(matmul_peak(torch.bfloat16) / 1e12, *probes) if probing else None
        steady = steady_rounds(probes, peak) if peak else []
        for (name, _, pipe), done in zip(settings, timed, strict=True):
            times_ms = np.concatenate([row["times_ms"] for row in done])
            reference = next(t for (_, _, p), t in zip(settings, timed, strict=True) if p == pipe)
            ratios = [a["median_ms"] / b["median_ms"] for a, b in zip(reference, done, strict=True)]
            row = {
                **done[0],
                **_latency_stats(times_ms, batch_size),
                "backend": name,
                "repeats": repeats,
                "rounds": rounds,
                "times_ms": [float(t) for t in times_ms],
                "speedup_vs_first": float(statistics.median(ratios)),
                "first_backend": settings[0][0],
            }
            if peak:
                row.update({"round_probe_tflops": probes, "matmul_peak_bf16_tflops": peak, "steady_rounds": steady})
            if steady:
                steady_ms = statistics.median(t for r in steady for t in done[r]["times_ms"])
                row["steady_median_ms"] = steady_ms
                row["steady_images_per_s"] = batch_size * 1000 / steady_ms
                row["steady_speedup_vs_first"] = float(statistics.median(ratios[r] for r in steady))
            rows.append(row)
    return rows


def _load_step(
    step: Callable[[str], None],
    model: str | Path,
    name: str,
    mode: str | None,
    device: torch.device,
    image_size: int,
    calibration: Path | None,
    workdir: str,
) -> Predictor:
    step(f"loading {name}{' (' + mode + ')' if mode else ''}")
    return load_for_bench(
        model, name, device=str(device), compile=mode, image_size=image_size, calibration=calibration, workdir=workdir
    )


def bench_markdown(rows: list[dict[str, Any]]) -> str:
    """Benchmark rows as a markdown table (for docs/benchmarks.md)."""
    paired = all("speedup_vs_first" in r for r in rows)
    steady = paired and shows_steady_columns(rows, "steady_median_ms")
    head = "| device | backend | precision | mode | pipeline | batch | p10 ms | median ms | p90 ms | images/s |"
    rule = "|---|---|---|---|---|---:|---:|---:|---:|---:|"
    if paired:
        head += f" vs {rows[0]['first_backend']} (paired rounds) |"
        rule += "---:|"
    if steady:
        head += f" steady rounds ({len(rows[0]['steady_rounds'])} of {rows[0]['rounds']}): median ms, images/s, vs {rows[0]['first_backend']} |"
        rule += "---:|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['device_name']} | {r['backend']} | {r['precision']} | {r['mode']} | {r['pipeline']} | {r['batch_size']} | "
            f"{r['p10_ms']:.2f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['images_per_s']:.1f} |"
        )
        if paired:
            line += f" {r['speedup_vs_first']:.2f}x |"
        if steady:
            line += (
                f" {r['steady_median_ms']:.2f}, {r['steady_images_per_s']:.1f}, {r['steady_speedup_vs_first']:.2f}x |"
            )
        lines.append(line)
    return "\n".join(lines)
