"""``polypseg bench``: inference speed, as warm-up, many timed repetitions, median latency and images per second.

Two pipelines are timed, both through :class:`polypseg.inference.predictor.Predictor` (the code ``predict``
runs): ``model`` (a normalised batch already on the device -> probabilities on the device) and
``end-to-end`` (``uint8`` images at the model's input size on the host -> upload, normalise,
model, sigmoid -> probabilities back on the host). Each repetition is timed on its own, with a CUDA
synchronisation before the clock stops, so the median is a latency, not a pipelined average.

Training speed (``bench-train``) is :mod:`polypseg.experiments.bench_train`, Grad-CAM speed
(``bench-explain``) :mod:`polypseg.experiments.bench_explain`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
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
    from polypseg.core.precision import cpu_bf16_flags
    from polypseg.inference.predictor import openvino_installed

    if torch.device(device).type == "cuda":
        return "torch"
    engine = "openvino" if openvino_installed() else "onnxruntime"
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
    from polypseg.core.precision import cpu_bf16_flags
    from polypseg.inference.predictor import openvino_installed

    if torch.device(device).type == "cuda":
        return ["torch", "torch-bf16"]
    names = []
    openvino = openvino_installed()
    for name, (engine, precision) in BACKEND_SPECS.items():
        if engine == "openvino" and not openvino:
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
    say: Callable[[str], None] = lambda message: None,
) -> Predictor:
    """A predictor for ``polypseg bench``: ``model`` is a checkpoint, a run folder, an ``.onnx``, a
    shipped model's name or ``random``.

    ``backend`` is a name of :data:`BACKEND_SPECS`. The int8 ones use the validated int8 model that
    ``backend="auto"`` would (beside the checkpoint or in the cache), else ``NAME.int8.onnx`` when
    present, else quantize into ``workdir``, calibrated on ``calibration`` (default: the bundled
    Kvasir-SEG sample); ``openvino-int8`` runs that same int8 ONNX graph in OpenVINO. ``say`` hears which
    int8 file is timed and whether ``calibration`` was used for it (an existing int8 model is not recalibrated).
    """
    from polypseg.inference.export import read_onnx_metadata

    if backend not in BACKENDS:
        raise BenchError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}, all")
    check_calibration(calibration)
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
            say(f"{backend}: timing the int8 model {model}{_unused_calibration(calibration)}")
        return Predictor.from_checkpoint(model, device=device, backend=engine, precision=precision, cache_dir=cache_dir)
    int8_paths = _int8_models(model, backend, calibration, cache_dir=cache_dir, workdir=workdir, say=say)
    if engine == "openvino":
        return Predictor.from_openvino(int8_paths)
    return Predictor.from_onnx(int8_paths, device=device)


def _int8_models(
    model: Path,
    backend: str,
    calibration: Path | str | None,
    *,
    cache_dir: Path | None,
    workdir: Path,
    say: Callable[[str], None],
) -> list[Path]:
    """Each checkpoint's int8 model to time: the validated or existing one, else one quantized into
    ``workdir`` (calibrated on ``calibration``, default the bundled sample)."""
    from polypseg.inference.export import cached_onnx, find_validated_int8, int8_path_for, quantize_onnx_int8
    from polypseg.models.checkpoint import find_checkpoints

    int8_paths = []
    for checkpoint in find_checkpoints(model):
        int8 = find_validated_int8(checkpoint, cache_dir) or int8_path_for(checkpoint)
        if int8.is_file():
            say(f"{backend}: timing the existing int8 model {int8}{_unused_calibration(calibration)}")
        else:
            if calibration is None:
                from polypseg.data.sample_data import sample_dataset_path

                calibration = sample_dataset_path()
            int8 = quantize_onnx_int8(
                cached_onnx(checkpoint, cache_dir),
                workdir / f"{checkpoint.parent.name}-{checkpoint.stem}.int8.onnx",
                calibration,
                warn=say,
            )
            say(f"{backend}: timing {checkpoint} quantized to int8 here, calibrated on {calibration}")
        int8_paths.append(int8)
    return int8_paths


def _unused_calibration(calibration: Path | str | None) -> str:
    """The tail of the timing note when ``--calibration`` was given for an int8 model that already exists."""
    return "; --calibration was not used (this int8 model is already calibrated)" if calibration else ""


def check_calibration(calibration: Path | str | None) -> None:
    """The one-line error of a ``--calibration`` path that does not exist (checked before any work)."""
    if calibration is not None and not Path(calibration).exists():
        raise BenchError(f"--calibration {calibration}: no such file or folder")


def cpu_feature_summary() -> str:
    """The CPU flags that decide polypseg's speed: AVX-512, its bf16/VNNI extensions, AMX."""
    from polypseg.core.precision import cpu_flags

    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
    return " ".join(flag for flag in wanted if flag in cpu_flags())


def benchmark_backends(
    model: str | Path,
    *,
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
    between_rounds: Callable[[], None] | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """``polypseg bench``: time one backend, ``all`` installed ones or ``auto``'s, per pipeline; one row each.

    With ``compile`` the torch backends are timed compiled (and eager too with ``compare_eager``).
    ``step`` hears what is being loaded and timed (for a transient status line), ``say`` which int8 model
    is timed (:func:`load_for_bench`). With ``rounds`` > 1
    every setting is loaded first (each warms up just before its first timing), then each round
    times ``repeats / rounds`` repetitions of every setting in turn, so a machine whose speed
    drifts (shared cloud CPUs) slows them alike; each row's ``speedup_vs_first`` is then the median
    over rounds of the first setting's round median over its own (same pipeline), paired like
    ``bench-train``'s, and ``round_median_ms`` holds its per-round medians. ``between_rounds`` (with
    ``rounds`` > 1) is called before the first round and after each, e.g. to read the machine's speed.
    """
    if rounds < 1 or rounds > repeats:
        raise BenchError(f"--rounds {rounds}: must be between 1 and --repeats ({repeats})")
    check_calibration(calibration)
    from polypseg.core.devices import resolve_device

    torch_device = resolve_device(device, label="--device")
    settings = _backend_settings(backend, torch_device, model, compile, compare_eager)
    pipelines = list(PIPELINES) if pipeline == "both" else [pipeline]
    if pipeline != "both" and pipeline not in PIPELINES:
        raise BenchError(f"--pipeline {pipeline}: choose both, {', '.join(PIPELINES)}")
    timing = {"batch_size": batch_size, "warmup": warmup, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="polypseg-bench-") as workdir:

        def load(name: str, mode: str | None) -> Predictor:
            step(f"loading {name}{' (' + mode + ')' if mode else ''}")
            return load_for_bench(
                model,
                name,
                device=str(torch_device),
                compile=mode,
                image_size=image_size,
                calibration=calibration,
                workdir=workdir,
                say=say,
            )

        if rounds == 1:  # one setting loaded at a time: the least memory
            rows = []
            for name, mode in settings:
                predictor = load(name, mode)
                for pipe in pipelines:
                    step(f"timing {name} {mode or 'eager'} {pipe}, batch {batch_size}")
                    rows.append({**benchmark(predictor, pipeline=pipe, **timing), "backend": name})
            return rows
        loaded = [(name, load(name, mode)) for name, mode in settings]
        return _interleaved_rounds(
            [(name, predictor, pipe) for name, predictor in loaded for pipe in pipelines],
            rounds=rounds,
            step=step,
            between_rounds=between_rounds,
            **timing,
        )


def _backend_settings(
    backend: str, device: torch.device, model: str | Path, compile: str, compare_eager: bool
) -> list[tuple[str, str | None]]:
    """(backend name, torch.compile mode or None) for each setting ``bench`` times."""
    if backend == "auto":
        backends = [auto_backend(device, model)]
    elif backend == "all":
        backends = available_backends(device)
    elif backend in BACKENDS:
        backends = [backend]
    else:
        raise BenchError(f"--backend {backend}: choose auto, all, {', '.join(BACKENDS)}")
    compile_mode = None if compile in ("none", "eager") else compile
    settings: list[tuple[str, str | None]] = []
    for name in backends:
        if name.startswith("torch") and compile_mode is not None:
            settings += [(name, None)] if compare_eager else []
            settings.append((name, compile_mode))
        else:
            settings.append((name, None))
    return settings


def _interleaved_rounds(
    settings: list[tuple[str, Predictor, str]],
    *,
    batch_size: int,
    warmup: int,
    repeats: int,
    rounds: int,
    step: Callable[[str], None],
    between_rounds: Callable[[], None] | None,
) -> list[dict[str, Any]]:
    """Time every (backend, predictor, pipeline) once per round; one row each, paired per round."""
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    timed: list[list[dict[str, Any]]] = [[] for _ in settings]
    if between_rounds is not None:
        between_rounds()
    for r, count in enumerate(per_round):
        for (name, predictor, pipe), done in zip(settings, timed, strict=True):
            step(f"round {r + 1}/{rounds}: timing {name} {pipe}, batch {batch_size}")
            first_round = not done
            done.append(
                benchmark(
                    predictor, batch_size=batch_size, warmup=warmup if first_round else 0, repeats=count, pipeline=pipe
                )
            )
        if between_rounds is not None:
            between_rounds()
    rows = []
    for (name, _, pipe), done in zip(settings, timed, strict=True):
        times_ms = np.concatenate([row["times_ms"] for row in done])
        reference = next(t for (_, _, p), t in zip(settings, timed, strict=True) if p == pipe)
        ratios = [a["median_ms"] / b["median_ms"] for a, b in zip(reference, done, strict=True)]
        rows.append(
            {
                **done[0],
                **_latency_stats(times_ms, batch_size),
                "backend": name,
                "repeats": repeats,
                "rounds": rounds,
                "times_ms": [float(t) for t in times_ms],
                "round_median_ms": [row["median_ms"] for row in done],
                "speedup_vs_first": float(statistics.median(ratios)),
                "first_backend": settings[0][0],
            }
        )
    return rows


def bench_markdown(rows: list[dict[str, Any]]) -> str:
    """Benchmark rows as a markdown table (for docs/benchmarks.md)."""
    paired = all("speedup_vs_first" in r for r in rows)
    head = "| device | backend | precision | mode | pipeline | batch | p10 ms | median ms | p90 ms | images/s |"
    rule = "|---|---|---|---|---|---:|---:|---:|---:|---:|"
    if paired:
        head += f" vs {rows[0]['first_backend']} (paired rounds) |"
        rule += "---:|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['device_name']} | {r['backend']} | {r['precision']} | {r['mode']} | {r['pipeline']} | {r['batch_size']} | "
            f"{r['p10_ms']:.2f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['images_per_s']:.1f} |"
        )
        if paired:
            line += f" {r['speedup_vs_first']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)
