"""Device choice shared by the library and the CLI: one meaning of ``auto`` everywhere."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from polypseg.errors import PolypsegError


class DeviceError(PolypsegError):
    """A requested device does not exist on this machine."""


def resolve_device(device: str | torch.device, label: str = "device") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; validates ``cpu``, ``cuda`` and ``cuda:N``.

    ``label`` names the option in error messages (e.g. ``--device`` on the command line).
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda") or (parsed.type == "cpu" and parsed.index):
        raise DeviceError(f"{label} {device}: use auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{label} {device}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(f"{label} {device}: this machine has {count} CUDA device(s), cuda:0-cuda:{count - 1}")
    return parsed


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


# mallopt(3) parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# An explicit choice of allocator or glibc malloc setting in the environment wins over ours.
_ALLOCATOR_ENV = ("LD_PRELOAD", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_freed_memory_kept = False


def environment_without_allocator_choice() -> dict[str, str]:
    """This process's environment less every allocator setting :func:`keep_freed_cpu_memory` defers to,
    for a child process in which it should take effect (or, with glibc's tunables added back, not)."""
    return {
        name: value
        for name, value in os.environ.items()
        if name not in (*_ALLOCATOR_ENV, "GLIBC_TUNABLES") and not name.startswith("MALLOC_")
    }


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning large blocks to the system.

    glibc serves every block of 32 MiB or more (at batch 16 and 256 px, many activations and their
    gradients) with its own ``mmap`` and unmaps it on free, so each CPU training step faults in fresh
    zeroed pages: the paper recipe's step at 256 px takes about 200k page faults in bf16 and 1.1M in
    fp32, a Grad-CAM batch of 16 in fp32 about 500k. With mmap off and the trim threshold at its
    maximum the heap keeps its peak and the next step reuses it: training 1.28x faster in bf16 and
    1.33x in fp32, Grad-CAM 1.61x in fp32, on a 2-core Xeon, for a peak resident memory 3% (bf16) to
    13% (fp32) higher, kept for the life of the process (``python benchmarks/cpu_checks.py malloc``,
    docs/benchmarks.md). This is what jemalloc or tcmalloc loaded with ``LD_PRELOAD`` give, without
    a system package.

    An explicit opt-in, because it changes the allocator of the whole process: ``polypseg train``,
    ``cv``, ``study``, ``explain`` and the ``bench-*`` commands call it on a CPU; library calls never
    do. In a notebook or your own training script, call it once before training or explaining on a
    CPU; leave it off in a long-lived server that should give memory back.

    Process-wide, once; a no-op off glibc and where the environment already chooses an allocator or
    glibc's malloc settings (``LD_PRELOAD``, ``MALLOC_*_``, ``GLIBC_TUNABLES`` with ``malloc``).
    Returns True when the setting is (now or already) ours.
    """
    global _freed_memory_kept
    if _freed_memory_kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(os.environ.get(name) for name in _ALLOCATOR_ENV) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes

    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    # mallopt returns 1 on success; the maximum int keeps the heap's top from being trimmed
    _freed_memory_kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _freed_memory_kept
