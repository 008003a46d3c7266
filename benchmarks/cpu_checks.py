"""CPU measurements behind docs/benchmarks.md's CPU sections, printed as JSON lines.

    python benchmarks/cpu_checks.py drift [--seconds 120]     # does this machine's speed drift?
    python benchmarks/cpu_checks.py upsample [--rounds 12]   # the decoder's gradient-layout fix
    python benchmarks/cpu_checks.py openvino-shape [--rounds 60]  # static vs dynamic batch in OpenVINO
    python benchmarks/cpu_checks.py fused-adam [--rounds 8]  # the bf16 step with foreach vs fused Adam
    python benchmarks/cpu_checks.py malloc [--pairs 3] [--parts probe,train,gradcam]  # glibc's malloc vs kept memory
    python benchmarks/cpu_checks.py profile [--steps 2]      # where a bf16 training step's time goes, per op
    python benchmarks/cpu_checks.py convs [--repeats 5]      # each convolution's bf16 forward and backward alone
    python benchmarks/cpu_checks.py contention [--seconds 60] [--rounds 24] [--parts cores,train,infer]
    python benchmarks/cpu_checks.py old-fp32 [--rounds 48] [--settings fp32-nchw-glibc,fp32-nchw,bf16-cl] [--wait-for 1.6] [--minutes 60]

drift: the bf16 matmul peak (best of 20 at 2048) read every 8 s while matmuls keep both cores busy,
so a shared host's changing speed shows before any comparison is trusted.
upsample: ATen's CPU ``upsample_nearest2d_backward`` on a channel slice of a channels-last bf16
gradient (what the skip concatenation hands it) against a channels-last copy plus the kernel; then
the paper recipe's whole bf16 channels-last training step with smp's decoder block and with
polypseg's (``polypseg.models.factory.UnetDecoderBlock``), interleaved, paired per round.
openvino-shape: the shipped model's exported graphs (int8, and fp32 run in bf16) compiled as exported
(dynamic batch) and per batch size (``polypseg.inference.openvino_engine.StaticShapeModel``), batch 1
and 16, interleaved; milliseconds per image.
fused-adam: the paper recipe's bf16 channels-last step with torch's default (foreach) Adam and with
the fused CPU Adam that bf16 runs now use, interleaved, paired per round; then the update alone.
malloc: ``polypseg bench-train`` (fp32 NCHW and bf16 channels-last) in fresh processes, alternately
with glibc's default malloc (``GLIBC_TUNABLES=glibc.malloc.perturb=0``, its default, set so that
polypseg leaves malloc alone) and with
``polypseg.core.devices.keep_freed_cpu_memory``; first the page faults of one step and the peak
resident memory in each setting (``--pairs 0``: only those); then torch fp32 Grad-CAM batches the same way.
profile: ``torch.profiler`` over the paper recipe's bf16 channels-last steps; each op's share of
the CPU time (self time, ops over 1%).
convs: every convolution of the paper recipe's network at its own input shape (batch 16, 256 px),
alone, bf16 channels-last, as autocast runs it: forward, and backward for the weight (and the input
where the network needs it); milliseconds (median of ``--repeats``) and achieved TFLOP/s, with a
quick matmul probe after each layer, so a layer far below the probe is a layer the CPU's
convolution kernels handle badly, not the machine's phase.
contention: is the drift another tenant's use of this machine's matrix units? ``cores``: each core
alone (one thread, pinned) reads its bf16 and fp32 matmul peak in turn for ``--seconds``. ``infer``:
the shipped model end to end at batch 1 in OpenVINO int8 and bf16, 12 images each per round;
``train``: one fp32 NCHW and one bf16 channels-last step of the paper recipe per round. Every
timing sits between two quick two-thread bf16 matmul probes; a round counts as uncontended when
all its probes read at least 0.8 of the run's best probe. The summaries give the medians over all
rounds and over the uncontended ones.
old-fp32: the paper recipe's step in a worker process per setting, taking turns, one step each per
round, with contention's probes between them: fp32 NCHW with glibc's default malloc (the CPU path
before ``keep_freed_cpu_memory`` existed), fp32 NCHW and bf16 channels-last as
polypseg trains now. Separate processes because the allocator setting is process-wide and, once a
heap has grown, cannot be undone; a worker waits on a pipe while the others run. Each step's page
faults are printed beside its time, so the first worker is seen to fault as glibc does. Fewer
``--settings`` make shorter rounds, so more of them fit in a fast phase; ``--wait-for TFLOPS``
starts each round only once a probe reads that much (at most 120 s of probing), so that rounds
begin with a fast spell rather than anywhere in it; ``--minutes`` starts no round after that long.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # speed_phases.py, beside this file
import speed_phases


def drift(seconds: float) -> None:
    from polypseg.experiments.bench_train import matmul_peak

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

    from polypseg.core.devices import keep_freed_cpu_memory
    from polypseg.core.recipes import get_recipe
    from polypseg.experiments.bench_train import TimedStep

    keep_freed_cpu_memory()  # as polypseg's training commands do

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
    timers = {name: TimedStep(get_recipe("paper"), torch.device("cpu"), "bf16-cl") for name in ("smp", "polypseg")}
    for block in timers["smp"].step.model.decoder.blocks:
        block.__class__ = SmpBlock
    _interleave(timers, rounds, "paper recipe, bf16 channels-last, batch 16, 256 px", "smp", "polypseg")


def openvino_shape(rounds: int) -> None:
    import numpy as np
    import openvino as ov

    from polypseg.experiments.bench import load_for_bench
    from polypseg.inference.openvino_engine import StaticShapeModel, openvino_config

    graphs = {
        name: load_for_bench("kvasir-unet-r34", name, device="cpu").metadata["onnx"][0]
        for name in ("openvino-int8", "openvino-bf16")
    }
    config = openvino_config("bf16")
    for batch in (1, 16):
        x = np.random.default_rng(0).standard_normal((batch, 3, 256, 256)).astype(np.float32)
        runners = {}
        for name, path in graphs.items():
            request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
            static = StaticShapeModel(path, config, first_batch=batch)
            runners[f"{name} dynamic"] = lambda r=request, x=x: r.infer({0: x})
            runners[f"{name} static"] = lambda m=static, x=x: m.infer(x)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for run in runners.values():
            run()
            run()
        for _ in range(rounds if batch == 1 else max(4, rounds // 8)):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1000 / batch)
        summary = {name: statistics.median(t) for name, t in times.items()}
        ratios = {
            name: statistics.median(
                a / b for a, b in zip(times[f"{name} dynamic"], times[f"{name} static"], strict=True)
            )
            for name in graphs
        }
        print(
            json.dumps({"batch": batch, "median_ms_per_image": summary, "paired_dynamic_over_static": ratios}),
            flush=True,
        )


def fused_adam(rounds: int) -> None:
    from polypseg.core.devices import keep_freed_cpu_memory
    from polypseg.core.recipes import get_recipe
    from polypseg.experiments.bench_train import TimedStep

    keep_freed_cpu_memory()  # as polypseg's training commands do

    timers = {name: TimedStep(get_recipe("paper"), torch.device("cpu"), "bf16-cl") for name in ("foreach", "fused")}
    foreach = timers["foreach"].step
    assert timers["fused"].step.optimizer.defaults["fused"], "bf16 steps use the fused CPU Adam"
    tc = get_recipe("paper").train
    foreach.optimizer = torch.optim.Adam(foreach.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    _interleave(timers, rounds, "paper recipe, bf16 channels-last, batch 16, 256 px", "foreach", "fused")
    # the update alone, on the gradients the last step left
    update_ms: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(10):
        for name, timer in timers.items():
            start = time.perf_counter()
            timer.step.optimizer.step()
            update_ms[name].append((time.perf_counter() - start) * 1000)
    print(json.dumps({"optimizer_step_ms": {name: statistics.median(t) for name, t in update_ms.items()}}), flush=True)


def _interleave(timers: dict, rounds: int, label: str, first: str, second: str) -> None:
    for timer in timers.values():
        timer.warm_up(2)
    for _ in range(rounds):
        for timer in timers.values():
            timer.run(1)
    times = {name: [t * 1000 for t in timer.times] for name, timer in timers.items()}
    ratios = [a / b for a, b in zip(times[first], times[second], strict=True)]
    print(
        json.dumps(
            {
                "step": label,
                "median_step_ms": {name: statistics.median(t) for name, t in times.items()},
                f"paired_{first}_over_{second}": statistics.median(ratios),
                "round_ratios": ratios,
            }
        ),
        flush=True,
    )


_FAULTS = """
import resource, sys, torch
from polypseg.core.recipes import get_recipe
from polypseg.core.devices import keep_freed_cpu_memory
from polypseg.experiments.bench_train import TimedStep
keep_freed_cpu_memory()  # as polypseg's training commands do; a no-op where the environment chose malloc's settings
timer = TimedStep(get_recipe("paper"), torch.device("cpu"), sys.argv[1])
timer.warm_up(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
timer.run(1)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_minflt - before, usage.ru_maxrss)
"""


_GRADCAM = """
import resource, time, torch
from polypseg.core.devices import keep_freed_cpu_memory
from polypseg.explain.gradcam import SegmentationGradCAM
from polypseg.models.checkpoint import load_checkpoint
from polypseg.models.pretrained import resolve_model
keep_freed_cpu_memory()  # as polypseg explain does; a no-op where the environment chose malloc's settings
model = load_checkpoint(resolve_model("kvasir-unet-r34")).model.float().eval()
images = torch.randn(16, 3, 256, 256, generator=torch.Generator().manual_seed(0))
with SegmentationGradCAM(model) as cam:
    cam(images), cam(images)
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(3):
        cam(images)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, time.perf_counter() - start)
"""


def _alternating(pairs: int, settings: dict) -> Iterator[tuple[int, str]]:
    """(pair, setting) in the order the processes run: each pair both settings, the first one alternating."""
    for pair in range(pairs):
        for name in list(settings)[:: 1 if pair % 2 == 0 else -1]:
            yield pair, name


def _allocator_environments() -> dict[str, dict[str, str]]:
    """Process environments for glibc's default malloc ("glibc") and polypseg's kept memory ("kept")."""
    from polypseg.core.devices import environment_without_allocator_choice

    base = environment_without_allocator_choice()
    # perturb=0 is glibc's default: a malloc tunable that changes nothing but makes polypseg leave malloc
    # alone. (MALLOC_MMAP_MAX_ would not do: setting it freezes glibc's mmap threshold at 128 KiB.)
    return {"glibc": {**base, "GLIBC_TUNABLES": "glibc.malloc.perturb=0"}, "kept": base}


def malloc(pairs: int, parts: str = "probe,train,gradcam") -> None:
    import os
    import subprocess
    import sys
    import tempfile

    settings = _allocator_environments()
    for variant in ("fp32-nchw", "bf16-cl") if "probe" in parts else ():
        probes = {
            name: subprocess.run(
                [sys.executable, "-c", _FAULTS, variant], env=env, capture_output=True, text=True, check=True
            ).stdout.split()[-2:]
            for name, env in settings.items()
        }
        faults = {name: int(probe[0]) for name, probe in probes.items()}
        peak_mib = {name: round(int(probe[1]) / 1024) for name, probe in probes.items()}  # ru_maxrss is in KiB
        print(
            json.dumps({"variant": variant, "page_faults_per_step": faults, "peak_resident_mib": peak_mib}), flush=True
        )
    images_per_s: dict[str, dict[str, list[float]]] = {name: {} for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for pair, name in _alternating(pairs if "train" in parts else 0, settings):
            out = os.path.join(tmp, f"{name}-{pair}.json")
            command = [sys.executable, "-m", "polypseg", "bench-train", "--recipe", "paper", "--device", "cpu"]
            command += ["--variants", "fp32-nchw,bf16-cl", "--rounds", "2", "--steps", "1", "--warmup", "2"]
            subprocess.run([*command, "--no-peak", "--json", out], env=settings[name], check=True, capture_output=True)
            for row in json.loads(Path(out).read_text()):
                images_per_s[name].setdefault(row["variant"], []).append(row["images_per_s"])
    # Grad-CAM (torch fp32, the shipped model, batches of 16 at 256 px) in fresh processes, alternately
    gradcam: dict[str, list[tuple[int, float]]] = {name: [] for name in settings}
    for _, name in _alternating(pairs if "gradcam" in parts else 0, settings):
        out = subprocess.run(
            [sys.executable, "-c", _GRADCAM], env=settings[name], capture_output=True, text=True, check=True
        ).stdout.split()[-2:]
        gradcam[name].append((int(out[0]) // 3, float(out[1]) / 3))
    if gradcam["glibc"]:
        glibc_s, kept_s = ([s for _, s in gradcam[name]] for name in ("glibc", "kept"))
        print(
            json.dumps(
                {
                    "gradcam": "torch fp32, shipped model, batch 16, 256 px",
                    "page_faults_per_batch": {name: [f for f, _ in runs] for name, runs in gradcam.items()},
                    "seconds_per_batch": {"glibc": glibc_s, "kept": kept_s},
                    "paired_kept_over_glibc": statistics.median(g / k for g, k in zip(glibc_s, kept_s, strict=True)),
                }
            ),
            flush=True,
        )
    for variant in images_per_s["glibc"]:
        glibc, kept = images_per_s["glibc"][variant], images_per_s["kept"][variant]
        print(
            json.dumps(
                {
                    "variant": variant,
                    "images_per_s": {"glibc": glibc, "kept": kept},
                    "paired_kept_over_glibc": statistics.median(k / g for k, g in zip(kept, glibc, strict=True)),
                }
            ),
            flush=True,
        )


def profile(steps: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from polypseg.core.devices import keep_freed_cpu_memory
    from polypseg.core.recipes import get_recipe
    from polypseg.experiments.bench_train import TimedStep

    keep_freed_cpu_memory()  # as polypseg's training commands do

    timer = TimedStep(get_recipe("paper"), torch.device("cpu"), "bf16-cl")
    timer.warm_up(3)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        timer.run(steps, timed=False)
    ops = prof.key_averages()
    total = sum(op.self_cpu_time_total for op in ops)
    shares = {op.key: op.self_cpu_time_total / total for op in ops if op.self_cpu_time_total / total > 0.01}
    print(
        json.dumps(
            {
                "step": "paper recipe, bf16 channels-last, batch 16, 256 px",
                "steps": steps,
                "self_cpu_s": total / 1e6,
                "share": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
            }
        ),
        flush=True,
    )


def _conv_flops(conv: torch.nn.Conv2d, output: torch.Tensor) -> float:
    """Multiply-adds times two of one forward pass: each output element sums Cin/groups x kh x kw products."""
    kh, kw = conv.kernel_size
    return 2.0 * output.numel() * conv.in_channels // conv.groups * kh * kw


def _time_conv(layer: torch.nn.Conv2d, x: torch.Tensor, repeats: int) -> dict:
    """Forward and backward (weight, and input when ``x`` requires grad) of one layer, median ms and TFLOP/s."""
    y = layer(x)
    grad = torch.randn_like(y)
    wanted = [x, layer.weight] if x.requires_grad else [layer.weight]
    forward_ms = _median_ms(lambda: layer(x), repeats)
    backward_ms = _median_ms(lambda: torch.autograd.grad(y, wanted, grad, retain_graph=True), repeats)
    flops = _conv_flops(layer, y)
    return {
        "forward_ms": forward_ms,
        "backward_ms": backward_ms,
        "forward_tflops": flops / forward_ms / 1e9,
        "backward_tflops": flops * len(wanted) / backward_ms / 1e9,
    }


def convs(repeats: int) -> None:
    import copy

    from polypseg.core.recipes import get_recipe
    from polypseg.models.factory import create_model

    config = get_recipe("paper")
    size, batch = config.train.image_size, config.train.batch_size
    model = create_model(config.model)
    shapes: dict[str, torch.Size] = {}

    def record_shape(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:  # None: output unchanged
            shapes[name] = args[0].shape

        return hook

    hooks = [
        module.register_forward_hook(record_shape(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    modules = dict(model.named_modules())
    first = next(iter(shapes))
    totals = {"forward_ms": 0.0, "backward_ms": 0.0}
    for name, shape in shapes.items():
        layer = copy.deepcopy(modules[name]).to(torch.bfloat16, memory_format=torch.channels_last)
        x = torch.randn(batch, *shape[1:]).bfloat16().contiguous(memory_format=torch.channels_last)
        x.requires_grad_(name != first)  # the first layer sees the image, which needs no gradient
        timing = _time_conv(layer, x, repeats)
        totals["forward_ms"] += timing["forward_ms"]
        totals["backward_ms"] += timing["backward_ms"]
        record = {"conv": name, "input": list(x.shape), "out_channels": layer.out_channels}
        record |= {"kernel": list(layer.kernel_size), "stride": list(layer.stride), **timing}
        print(json.dumps(record | {"probe_tflops": speed_phases.speed_probe()}), flush=True)
    print(
        json.dumps({"convolutions": len(shapes), **totals, "unit": f"ms, batch {batch}, bf16 channels-last"}),
        flush=True,
    )


_CORE_PEAKS = """
import json, os, sys, time, torch
torch.set_num_threads(1)
cores, seconds = [int(c) for c in sys.argv[1].split(",")], float(sys.argv[2])
def timed(f):
    start = time.perf_counter(); f(); return time.perf_counter() - start
def peak(a):
    torch.mm(a, a)
    return 2 * a.shape[0] ** 3 / min(timed(lambda: torch.mm(a, a)) for _ in range(6)) / 1e12
bf16, fp32 = torch.randn(2048, 2048).bfloat16(), torch.randn(1024, 1024)
start = time.time()
while time.time() - start < seconds:
    reading = {"t_s": round(time.time() - start, 1)}
    for core in cores:
        os.sched_setaffinity(0, {core})
        reading[f"cpu{core}"] = {"bf16_tflops": round(peak(bf16), 3), "fp32_tflops": round(peak(fp32), 3)}
    print(json.dumps(reading), flush=True)
"""


def _uncontended(rounds: list[dict]) -> list[dict]:
    """The rounds all of whose probes (one after every timing in it, not only at its ends) read steady."""

    best = max(p for r in rounds for p in r["probes"])
    return [r for r in rounds if speed_phases.is_steady(r["probes"], best)]


def _core_peaks(seconds: float) -> None:
    import os
    import subprocess
    import sys

    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    out = subprocess.run(
        [sys.executable, "-c", _CORE_PEAKS, cores, str(seconds)], capture_output=True, text=True, check=True
    ).stdout
    readings = [json.loads(line) for line in out.splitlines()]
    for reading in readings:
        print(json.dumps(reading), flush=True)
    summary = {}
    for core in (k for k in readings[0] if k.startswith("cpu")):
        for dtype in ("bf16_tflops", "fp32_tflops"):
            values = [r[core][dtype] for r in readings]
            slow = [v for v in values if v < 0.6 * max(values)]
            summary[f"{core} {dtype}"] = {
                "max": max(values),
                "min": min(values),
                "readings_below_0.6_of_max": f"{len(slow)}/{len(values)}",
            }
    print(json.dumps({"cores": "one thread each, pinned", "summary": summary}), flush=True)


def _contended_summary(label: str, rounds: list[dict], ratios: list[tuple[str, str]], unit: str) -> None:
    quiet = _uncontended(rounds)
    best = max(p for r in rounds for p in r["probes"])
    summary: dict = {
        "measured": label,
        "rounds": len(rounds),
        "uncontended_rounds": len(quiet),
        "best_probe_tflops": best,
    }
    for name, subset in (("all", rounds), ("uncontended", quiet)):
        if not subset:
            continue
        summary[name] = {k: statistics.median(r[k] for r in subset) for k in subset[0] if k not in ("probes", "round")}
        for slower, faster in ratios:
            summary[name][f"paired_{slower}_over_{faster}"] = statistics.median(r[slower] / r[faster] for r in subset)
    summary["unit"] = unit
    print(json.dumps(summary), flush=True)


def _probed_rounds(
    rounds: int,
    names: Iterable[str],
    measure: Callable[[str], dict],
    wait_for: float = 0.0,
    max_wait_s: float = 120.0,
    minutes: float | None = None,
) -> list[dict]:
    """``rounds`` rounds, each measuring every name in turn (``measure`` returns the fields it timed),
    with a quick matmul probe before the first and after each; every round is printed as a JSON line.

    With ``wait_for`` (TFLOP/s) a round starts only once a probe reads that much (probing again and
    again, for at most ``max_wait_s``; ``waited_s`` in its record): on a host whose fast spells are
    shorter than a round, rounds then start at a spell's beginning. Which rounds count as steady is
    still decided by all their probes, the ones after each timing included. With ``minutes`` no
    round starts after that many minutes: fewer rounds, each of them whole.
    """

    names = list(names)
    records = []
    deadline = time.perf_counter() + 60 * minutes if minutes else float("inf")
    for r in range(rounds):
        start = time.perf_counter()
        if start > deadline:
            break
        record: dict = {"round": r, "probes": [speed_phases.speed_probe()]}
        while record["probes"][0] < wait_for and time.perf_counter() - start < max_wait_s:
            record["probes"][0] = speed_phases.speed_probe()
        if wait_for:
            record["waited_s"] = round(time.perf_counter() - start, 1)
        for name in names:
            record.update(measure(name))
            record["probes"].append(speed_phases.speed_probe())
        print(json.dumps(record), flush=True)
        records.append(record)
    return records


def contention(seconds: float, rounds: int, parts: str) -> None:
    if "cores" in parts:
        _core_peaks(seconds)
    # inference first: the training part's keep_freed_cpu_memory is process-wide, and `predict` does not call it
    if "infer" in parts:
        from polypseg.experiments.bench import benchmark, load_for_bench

        predictors = {b: load_for_bench("kvasir-unet-r34", b, device="cpu") for b in ("openvino-int8", "openvino-bf16")}
        for predictor in predictors.values():
            benchmark(predictor, warmup=10, repeats=1, pipeline="end-to-end")

        def images_per_s(backend: str) -> dict:
            row = benchmark(predictors[backend], warmup=0, repeats=12, pipeline="end-to-end")
            return {f"{backend}_images_per_s": row["images_per_s"]}

        infer_rounds = _probed_rounds(rounds, predictors, images_per_s)
        _contended_summary(
            "shipped model, end to end, batch 1, 256 px, medians of 12", infer_rounds, [], "images per s"
        )
    if "train" in parts:
        from polypseg.core.devices import keep_freed_cpu_memory
        from polypseg.core.recipes import get_recipe
        from polypseg.experiments.bench_train import TimedStep

        keep_freed_cpu_memory()  # as polypseg's training commands do
        timers = {v: TimedStep(get_recipe("paper"), torch.device("cpu"), v) for v in ("fp32-nchw", "bf16-cl")}
        for timer in timers.values():
            timer.warm_up(2)

        def step_ms(variant: str) -> dict:
            timers[variant].run(1)
            return {f"{variant}_ms": timers[variant].times[-1] * 1000}

        train_rounds = _probed_rounds(rounds, timers, step_ms)
        _contended_summary(
            "paper recipe step, batch 16, 256 px", train_rounds, [("fp32-nchw_ms", "bf16-cl_ms")], "ms per step"
        )


_STEP_WORKER = """
import resource, sys, torch
from polypseg.core.recipes import get_recipe
from polypseg.core.devices import keep_freed_cpu_memory
from polypseg.experiments.bench_train import TimedStep
kept = keep_freed_cpu_memory()  # as polypseg's training commands do, unless the environment chose malloc's settings
timer = TimedStep(get_recipe("paper"), torch.device("cpu"), sys.argv[1])
timer.warm_up(2)
print("ready", int(kept), flush=True)
for _ in sys.stdin:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    timer.run(1)
    print(timer.times[-1] * 1000, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
"""


# old-fp32's settings: name -> (bench-train variant, allocator); the first is the fp32 path as it
# was before keep_freed_cpu_memory
OLD_FP32_SETTINGS = {
    "fp32-nchw-glibc": ("fp32-nchw", "glibc"),
    "fp32-nchw": ("fp32-nchw", "kept"),
    "bf16-cl": ("bf16-cl", "kept"),
}


def old_fp32(
    rounds: int, settings: str = ",".join(OLD_FP32_SETTINGS), wait_for: float = 0.0, minutes: float | None = None
) -> None:
    import subprocess
    import sys

    environments = _allocator_environments()
    names = settings.split(",")
    if unknown := set(names) - set(OLD_FP32_SETTINGS):
        raise SystemExit(f"unknown settings {sorted(unknown)}; choose from {', '.join(OLD_FP32_SETTINGS)}")
    plan = {name: OLD_FP32_SETTINGS[name] for name in names}
    workers = {}
    try:
        for name, (variant, allocator) in plan.items():  # one at a time: warm-ups would slow each other
            worker = subprocess.Popen(
                [sys.executable, "-c", _STEP_WORKER, variant],
                env=environments[allocator],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            ready = worker.stdout.readline().split()
            if ready[:1] != ["ready"] or (ready[1] == "1") != (allocator == "kept"):
                raise SystemExit(f"worker {name} did not start with the {allocator} allocator: {ready}")
            workers[name] = worker

        def worker_step(name: str) -> dict:
            workers[name].stdin.write("step\n")
            workers[name].stdin.flush()
            step_ms, faults = workers[name].stdout.readline().split()
            return {f"{name}_ms": float(step_ms), f"{name}_page_faults": int(faults)}

        train_rounds = _probed_rounds(rounds, workers, worker_step, wait_for=wait_for, minutes=minutes)
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    _contended_summary(
        "paper recipe step, batch 16, 256 px, each setting in its own process",
        train_rounds,
        [
            (f"{slower}_ms", f"{faster}_ms")
            for slower, faster in (
                ("fp32-nchw-glibc", "bf16-cl"),
                ("fp32-nchw", "bf16-cl"),
                ("fp32-nchw-glibc", "fp32-nchw"),
            )
            if slower in plan and faster in plan
        ],
        "ms per step",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    sub.add_parser("drift").add_argument("--seconds", type=float, default=120)
    sub.add_parser("upsample").add_argument("--rounds", type=int, default=12)
    sub.add_parser("openvino-shape").add_argument("--rounds", type=int, default=60)
    sub.add_parser("fused-adam").add_argument("--rounds", type=int, default=8)
    malloc_parser = sub.add_parser("malloc")
    malloc_parser.add_argument("--pairs", type=int, default=3)
    malloc_parser.add_argument("--parts", default="probe,train,gradcam", help="comma-separated: probe, train, gradcam")
    sub.add_parser("profile").add_argument("--steps", type=int, default=2)
    sub.add_parser("convs").add_argument("--repeats", type=int, default=5)
    contention_parser = sub.add_parser("contention")
    contention_parser.add_argument("--seconds", type=float, default=60, help="of per-core readings")
    contention_parser.add_argument("--rounds", type=int, default=24)
    contention_parser.add_argument("--parts", default="cores,train,infer", help="comma-separated: cores, train, infer")
    old_fp32_parser = sub.add_parser("old-fp32")
    old_fp32_parser.add_argument("--rounds", type=int, default=48)
    old_fp32_parser.add_argument(
        "--settings", default=",".join(OLD_FP32_SETTINGS), help="comma-separated, in round order"
    )
    old_fp32_parser.add_argument(
        "--wait-for", type=float, default=0.0, help="TFLOP/s: start each round once a probe reads this (<= 120 s)"
    )
    old_fp32_parser.add_argument("--minutes", type=float, default=None, help="start no round after this many minutes")
    args = parser.parse_args()
    if args.check == "drift":
        drift(args.seconds)
    elif args.check == "malloc":
        malloc(args.pairs, args.parts)
    elif args.check == "profile":
        profile(args.steps)
    elif args.check == "convs":
        convs(args.repeats)
    elif args.check == "contention":
        contention(args.seconds, args.rounds, args.parts)
    elif args.check == "old-fp32":
        old_fp32(args.rounds, args.settings, args.wait_for, args.minutes)
    else:
        {"upsample": upsample, "openvino-shape": openvino_shape, "fused-adam": fused_adam}[args.check](args.rounds)


if __name__ == "__main__":
    main()
