"""Paired timings on a CPU whose speed changes under the measurement, and the rounds run in its fast phase.

On a shared host another tenant's work on the same physical cores can slow their matrix units 2-3x
for seconds at a time. ``polypseg bench-train`` and ``polypseg bench --rounds`` already pair their
variants per round, so a slow spell hits them alike; this script adds a quick bf16 matmul probe
before the first round and after each, and reports the same medians over the *steady* rounds only:
those whose probes on both sides read at least 80% of the machine's best reading.

    python benchmarks/speed_phases.py train --recipe paper --rounds 16 --steps 1 --json train.json
    python benchmarks/speed_phases.py infer --model kvasir-unet-r34 --rounds 16 --repeats 96 --json infer.json

Each prints the rows (with ``round_probe_tflops``, ``steady_rounds`` and the steady figures) as JSON
and one line saying whether the machine's speed changed. ``cpu_checks.py`` uses the same probe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# A round is "steady" when the matmul probes on both sides of it read at least this share of the
# machine's best reading.
STEADY_FRACTION = 0.8


def speed_probe() -> float:
    """A quick bf16 matmul peak in TFLOP/s (best of 3 at 2048): which phase a shared CPU is in now."""
    from polypseg.experiments.bench_train import matmul_peak

    return matmul_peak(torch.bfloat16, repeats=3) / 1e12


def is_steady(probes: Sequence[float], peak: float, fraction: float = STEADY_FRACTION) -> bool:
    """Whether every probe around a timing read at least ``fraction`` of ``peak``: it ran in the fast phase."""
    return min(probes) >= fraction * peak


def steady_rounds(probes: Sequence[float], peak: float, fraction: float = STEADY_FRACTION) -> list[int]:
    """The rounds (round ``r`` lies between ``probes[r]`` and ``probes[r + 1]``) that ran in the fast phase."""
    return [r for r in range(len(probes) - 1) if is_steady(probes[r : r + 2], peak, fraction)]


def drifted(row: dict[str, Any]) -> bool:
    """Whether a row's matmul probes show the machine's speed changing between rounds."""
    probes = row.get("round_probe_tflops") or []
    return bool(probes) and min(probes) < STEADY_FRACTION * row["probe_peak_tflops"]


def drift_warning(row: dict[str, Any]) -> str:
    """One line for a row that has :func:`drifted`."""
    probes = row["round_probe_tflops"]
    return (
        f"this machine's bf16 matmul speed changed between rounds ({min(probes):.2f}-{max(probes):.2f} TFLOP/s: a "
        f"shared or throttled CPU), so the absolute figures mix its phases; {len(row['steady_rounds'])} of "
        f"{row['rounds']} rounds ran with it at >= {STEADY_FRACTION:.0%} of its best"
    )


def _mark_rounds(rows: list[dict[str, Any]], probes: list[float], peak: float) -> list[int]:
    steady = steady_rounds(probes, peak)
    for row in rows:
        row.update({"round_probe_tflops": probes, "probe_peak_tflops": peak, "steady_rounds": steady})
    return steady


def probed_training(config: Any, **options: Any) -> list[dict[str, Any]]:
    """:func:`polypseg.experiments.bench_train.benchmark_training` with a probe around every round.

    Adds ``steady_step_ms`` and ``steady_speedup_vs_first`` (the medians over the steady rounds) where
    there are any; the peak is the best of the probes and of the full bf16 matmul measurement.
    """
    from polypseg.experiments.bench_train import benchmark_training

    probes: list[float] = []
    rows = benchmark_training(config, peak=True, between_rounds=lambda: probes.append(speed_probe()), **options)
    steady = _mark_rounds(rows, probes, max(rows[0]["matmul_peak_bf16_tflops"], *probes))
    first = rows[0]["round_step_ms"]
    for row in rows if steady else []:
        row["steady_step_ms"] = statistics.median(row["round_step_ms"][r] for r in steady)
        row["steady_speedup_vs_first"] = statistics.median(first[r] / row["round_step_ms"][r] for r in steady)
    return rows


def probed_backends(model: str | Path, **options: Any) -> list[dict[str, Any]]:
    """:func:`polypseg.experiments.bench.benchmark_backends` (with ``rounds`` > 1) with a probe around every round.

    Adds ``steady_median_ms``, ``steady_images_per_s`` and ``steady_speedup_vs_first`` (against the
    first backend of the same pipeline) over the steady rounds, where there are any.
    """
    from polypseg.experiments.bench import benchmark_backends
    from polypseg.experiments.bench_train import matmul_peak

    probes: list[float] = []
    rows = benchmark_backends(model, between_rounds=lambda: probes.append(speed_probe()), **options)
    steady = _mark_rounds(rows, probes, max(matmul_peak(torch.bfloat16) / 1e12, *probes))
    for row in rows if steady else []:
        rounds, repeats = row["rounds"], row["repeats"]
        counts = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
        starts = [sum(counts[:r]) for r in range(rounds)]
        times = [t for r in steady for t in row["times_ms"][starts[r] : starts[r] + counts[r]]]
        reference = next(other for other in rows if other["pipeline"] == row["pipeline"])
        row["steady_median_ms"] = statistics.median(times)
        row["steady_images_per_s"] = row["batch_size"] * 1000 / row["steady_median_ms"]
        row["steady_speedup_vs_first"] = statistics.median(
            reference["round_median_ms"][r] / row["round_median_ms"][r] for r in steady
        )
    return rows


def steady_summary(rows: list[dict[str, Any]], label: Callable[[dict[str, Any]], str], key: str) -> str:
    """The drift line, followed by each row's steady figure (``key``) where the machine drifted."""
    if not drifted(rows[0]):
        return f"the machine's speed held ({len(rows[0]['steady_rounds'])} of {rows[0]['rounds']} rounds steady)"
    line = drift_warning(rows[0])
    if rows[0]["steady_rounds"]:
        line += ": " + ", ".join(f"{label(r)} {r[key]:.1f} ms ({r['steady_speedup_vs_first']:.2f}x)" for r in rows)
    return line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    train = sub.add_parser("train", help="bench-train's CPU variants, probed")
    train.add_argument("--recipe", default="paper")
    train.add_argument("--variants", default="fp32-nchw,fp32-cl,bf16-cl")
    train.add_argument("--steps", type=int, default=1)
    train.add_argument("--warmup", type=int, default=2)
    train.add_argument("--train-images", type=int, default=800)
    infer = sub.add_parser("infer", help="bench --backend all at batch 1, probed")
    infer.add_argument("--model", default="random")
    infer.add_argument("--backend", default="all")
    infer.add_argument("--repeats", type=int, default=96)
    infer.add_argument("--warmup", type=int, default=5)
    for each in (train, infer):
        each.add_argument("--rounds", type=int, default=16)
        each.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from polypseg.core.devices import keep_freed_cpu_memory

    keep_freed_cpu_memory()  # as the polypseg commands do
    if args.what == "train":
        from polypseg.core.recipes import get_recipe

        variants = tuple(args.variants.split(","))
        rows = probed_training(
            get_recipe(args.recipe), device="cpu", steps=args.steps, warmup=args.warmup,
            train_images=args.train_images, variants=variants, rounds=args.rounds,
        )  # fmt: skip
        summary = steady_summary(rows, lambda r: r["variant"], "steady_step_ms")
    else:
        rows = probed_backends(
            args.model, backend=args.backend, device="cpu", repeats=args.repeats, warmup=args.warmup, rounds=args.rounds
        )
        for row in rows:
            row.pop("times_ms")
        summary = steady_summary(rows, lambda r: f"{r['backend']} {r['pipeline']}", "steady_median_ms")
    text = json.dumps(rows, indent=1)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    print(summary, file=sys.stderr)


if __name__ == "__main__":
    main()
