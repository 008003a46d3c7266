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
