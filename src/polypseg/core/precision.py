"""One precision rule for training, evaluation, Grad-CAM and inference: ``auto``, ``fp32`` or ``bf16``.

``auto`` means bf16 autocast + channels-last on CUDA, and on a CPU that computes bf16 natively
(``amx_bf16`` or ``avx512_bf16`` in its flags); fp32 everywhere else. On a CPU without native bf16,
PyTorch emulates it and is slower than fp32, which is why ``auto`` checks the flags instead of
trying. Master weights, optimizer state, losses and metrics stay fp32 in every mode: autocast only
lowers the convolutions and matmuls.

``fp32`` on CPU is the NCHW fp32 path, bit for bit what polypseg did before precision existed.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from polypseg.errors import PolypsegError

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        return frozenset(_cpuinfo_flags(Path("/proc/cpuinfo").read_text(errors="replace")))
    except OSError:
        return frozenset()


def cpu_bf16_flags(flags: frozenset[str] | set[str] | None = None) -> list[str]:
    """The native-bf16 flags this CPU has (``amx_bf16``, ``avx512_bf16``), in that order."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def check_precision(precision: str, label: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise PolypsegError(f"{label} '{precision}': choose one of {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(
    precision: str, device: torch.device | str, flags: frozenset[str] | set[str] | None = None
) -> str:
    """``auto`` -> ``bf16`` on CUDA or a CPU with native bf16, else ``fp32``; others pass through."""
    check_precision(precision)
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and cpu_bf16_flags(flags):
        return "bf16"
    return "fp32"


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """bf16 autocast for a resolved ``bf16`` on CPU or CUDA; a no-op for ``fp32``."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def use_channels_last(device: torch.device | str, precision: str, requested: bool = True) -> bool:
    """Channels-last on CUDA (when requested) and with bf16 on CPU, where oneDNN's bf16 kernels want it.

    CPU fp32 stays NCHW so that ``--precision fp32`` is exactly the historical path.
    """
    device = torch.device(device)
    if not requested:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and resolve_precision(precision, device) == "bf16"


def describe(precision: str, device: torch.device | str, channels_last: bool = True) -> str:
    """One line for the console: what was chosen and why (``channels_last``: the run's ``train.channels_last``)."""
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if device.type == "cpu":
        native = cpu_bf16_flags()
        why = f"CPU flags: {', '.join(native)}" if native else "this CPU has no native bf16 (amx_bf16/avx512_bf16)"
    else:
        why = device.type
    layout = "channels-last" if use_channels_last(device, resolved, channels_last) else "NCHW"
    asked = f"{precision} -> " if precision == "auto" else ""
    return f"precision: {asked}{resolved} ({layout}; {why})"
