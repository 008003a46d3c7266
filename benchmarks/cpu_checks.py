"""Two CPU measurements behind docs/benchmarks.md's AMX section (issue #11), printed as JSON lines.

    python benchmarks/cpu_checks.py drift [--seconds 120]     # does this machine's speed drift?
    python benchmarks/cpu_checks.py upsample [--rounds 12]   # the decoder's gradient-layout fix

drift: the bf16 matmul peak (best of 20 at 2048) read every 8 s while matmuls keep both cores busy,
so a shared host's changing speed shows before any comparison is trusted.
upsample: ATen's CPU ``upsample_nearest2d_backward`` on a channel slice of a channels-last bf16
gradient (what the skip concatenation hands it) against a channels-last copy plus the kernel; then
the paper recipe's whole bf16 channels-last training step with smp's decoder block and with
polypseg's (``polypseg.models.factory.UnetDecoderBlock``), interleaved, paired per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def drift(seconds: float) -> None:
    from polypseg.experiments.bench import matmul_peak

    start = time.time()
    busy = torch.randn(2048, 2048).bfloat16()
    while time.time() - start < seconds:
        reading = {"t_s": round(time.time() - start, 1), "bf16_tflops": matmul_peak(torch.bfloat16) / 1e12}
        print(json.dumps(reading), flush=True)
        until = time.time() + 8
        while time.time() < until:
            torch.mm(busy, busy)


def _median_ms(step, repeats: int = 5) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def upsample(rounds: int) -> None:
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock as SmpBlock

    from polypseg.core.config import get_recipe
    from polypseg.experiments.bench import _TimedStep

    grad = torch.randn(16, 96, 128, 128).bfloat16().contiguous(memory_format=torch.channels_last)[:, :64]
    backward = torch.ops.aten.upsample_nearest2d_backward.default
    print(
        json.dumps(
            {
                "op": "upsample_nearest2d_backward, [16, 64, 128, 128] bf16 channel slice of a channels-last gradient",
                "as_handed_ms": _median_ms(lambda: backward(grad, [128, 128], [16, 64, 64, 64])),
                "channels_last_copy_then_kernel_ms": _median_ms(
                    lambda: backward(grad.contiguous(memory_format=torch.channels_last), [128, 128], [16, 64, 64, 64])
                ),
            }
        ),
        flush=True,
    )

    # bench-train's own timed step (random batch, the whole TrainStep), once per decoder block class
    timers = {name: _TimedStep(get_recipe("paper"), torch.device("cpu"), "bf16-cl") for name in ("smp", "polypseg")}
    for block in timers["smp"].step.model.decoder.blocks:
        block.__class__ = SmpBlock
    for timer in timers.values():
        timer.warm_up(2)
    for _ in range(rounds):
        for timer in timers.values():
            timer.run(1)
    times = {name: [t * 1000 for t in timer.times] for name, timer in timers.items()}
    ratios = [a / b for a, b in zip(times["smp"], times["polypseg"], strict=True)]
    print(
        json.dumps(
            {
                "step": "paper recipe, bf16 channels-last, batch 16, 256 px",
                "median_step_ms": {name: statistics.median(t) for name, t in times.items()},
                "paired_smp_over_polypseg": statistics.median(ratios),
                "round_ratios": ratios,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    sub.add_parser("drift").add_argument("--seconds", type=float, default=120)
    sub.add_parser("upsample").add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    drift(args.seconds) if args.check == "drift" else upsample(args.rounds)


if __name__ == "__main__":
    main()
