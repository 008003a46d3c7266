"""``polypseg bench-train``: training speed of a recipe, and where an epoch's time goes.

The real :class:`polypseg.training.loop.TrainStep` runs on random data already on the device, steps
back to back with one synchronisation at the end; with several variants (precision, layout,
compile) each round times every variant in turn, so a change in the machine's speed hits them alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polypseg.core.config import RunConfig
from polypseg.core.devices import device_name
from polypseg.experiments.bench import BenchError, cpu_feature_summary

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


class TimedStep:
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
    *,
    device: str = "auto",
    steps: int = 30,
    warmup: int = 5,
    train_images: int = 800,
    variants: tuple[str, ...] = ("recipe",),
    rounds: int = 1,
    peak: bool = False,
    between_rounds: Callable[[], None] | None = None,
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
    with ``peak``, that as a fraction of this machine's measured bf16 matmul peak.
    ``between_rounds`` is called before the first round and after each (e.g. to read the machine's speed).
    """
    from polypseg.core.devices import resolve_device

    if steps < 1 or warmup < 1 or rounds < 1:
        raise BenchError("steps, warmup and rounds must be >= 1 (the first warm-up step is timed on its own)")
    torch_device = resolve_device(device)
    tc = config.train
    low = tc.progressive_size if tc.progressive_size and tc.progressive_epochs else None
    timers: list[tuple[TimedStep, TimedStep | None]] = []
    for variant in variants:
        main = TimedStep(config, torch_device, variant)
        small = TimedStep(config, torch_device, variant, size=low) if low else None
        main.warm_up(warmup)
        if small:
            small.warm_up(warmup)
        timers.append((main, small))
    if between_rounds is not None:
        between_rounds()
    for _ in range(rounds):
        for main, small in timers:
            main.run(steps)
            if small:
                small.run(steps)
        if between_rounds is not None:
            between_rounds()
    flops = {size: 3 * forward_flops(config, size) for size in {tc.image_size, low or tc.image_size}}
    peaks = _matmul_peaks(torch_device) if peak else None
    settings = {
        "device": torch_device,
        "warmup": warmup,
        "steps": steps,
        "rounds": rounds,
        "train_images": train_images,
    }
    return [_training_row(config, main, small, timers[0][0], flops, peaks, **settings) for main, small in timers]


def _matmul_peaks(device: torch.device) -> dict[str, float]:
    """This machine's bf16 and fp32 square-matmul peaks in TFLOP/s."""
    return {
        "matmul_peak_bf16_tflops": matmul_peak(torch.bfloat16, device=str(device)) / 1e12,
        "matmul_peak_fp32_tflops": matmul_peak(torch.float32, device=str(device)) / 1e12,
    }


def _training_row(
    config: RunConfig,
    main: TimedStep,
    small: TimedStep | None,
    first: TimedStep,
    flops: dict[int, float],
    peaks: dict[str, float] | None,
    *,
    device: torch.device,
    warmup: int,
    steps: int,
    rounds: int,
    train_images: int,
) -> dict[str, Any]:
    """One :func:`benchmark_training` row: a variant's medians, its paired speed-up and the extrapolations."""
    from polypseg.training.loop import epoch_size

    tc = config.train
    steps_per_epoch = max(1, train_images // tc.batch_size)
    per_step = statistics.median(main.times)
    small_step = statistics.median(small.times) if small else per_step
    epoch_seconds = [steps_per_epoch * (small_step if epoch_size(tc, e) else per_step) for e in range(tc.epochs)]
    achieved = flops[tc.image_size] * tc.batch_size / per_step
    row: dict[str, Any] = {
        "recipe": tc.recipe,
        "variant": main.variant,
        "device": str(device),
        "device_name": device_name(device),
        "cpu_flags": cpu_feature_summary() if device.type == "cpu" else "",
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
        row["progressive_size"] = small.size
        row["progressive_step_ms"] = small_step * 1000
        row["progressive_epochs"] = tc.progressive_epochs
    if peaks:
        row.update(peaks)
        row["fraction_of_bf16_peak"] = achieved / 1e12 / peaks["matmul_peak_bf16_tflops"]
    return row


def training_breakdown(
    config: RunConfig,
    *,
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
    timer = TimedStep(config, torch_device, "recipe")
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


def training_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`benchmark_training` results (with TFLOP/s and the peak fraction when measured)."""
    with_peak = any("fraction_of_bf16_peak" in r for r in rows)
    paired = len(rows) > 1 and all("speedup_vs_first" in r for r in rows)
    head = "| setting | device | precision | layout | compile | batch | EMA | step ms | images/s | TFLOP/s |"
    rule = "|---|---|---|---|---|---:|---|---:|---:|---:|"
    if paired:
        head += f" vs {rows[0]['variant']} (paired rounds) |"
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
        if with_peak:
            line += f" {100 * r.get('fraction_of_bf16_peak', float('nan')):.0f}% |"
        line += f" {r['first_step_s']:.1f} | {r['epoch_s']:.1f} | {r['run_minutes']:.1f} ({r['epochs']}) |"
        lines.append(line)
    return "\n".join(lines)
