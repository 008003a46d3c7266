"""One meaning of ``--device auto`` everywhere; bad devices are one-line user errors."""

import pytest
import torch

from polypseg.core.devices import DeviceError, resolve_device


def test_auto_picks_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_bad_devices_name_the_option():
    with pytest.raises(DeviceError, match="--device tpu"):
        resolve_device("tpu", label="--device")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_malformed_and_missing_cuda_devices_are_one_line_errors(monkeypatch):
    for bad in ("cudax", "cuda:x", "cpu:1", "mps"):
        with pytest.raises(DeviceError, match=f"--device {bad}: use auto, cpu, cuda or cuda:N"):
            resolve_device(bad, label="--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match=r"--device cuda:3: this machine has 1 CUDA device\(s\)"):
        resolve_device("cuda:3", label="--device")


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.fixture
def fake_glibc(monkeypatch):
    import ctypes
    import platform

    from polypseg.core import devices

    libc = _FakeLibc()
    monkeypatch.setattr(devices, "_freed_memory_kept", False)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    for name in (*devices._ALLOCATOR_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    return libc


def test_freed_memory_is_kept_once_with_mmap_off_and_no_trim(fake_glibc):
    from polypseg.core.devices import keep_freed_cpu_memory

    assert keep_freed_cpu_memory() and keep_freed_cpu_memory()
    assert fake_glibc.calls == [(-4, 0), (-1, 2**31 - 1)]  # M_MMAP_MAX 0, M_TRIM_THRESHOLD max, once


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LD_PRELOAD", "libjemalloc.so.2"),
        ("MALLOC_MMAP_MAX_", "65536"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"),
    ],
)
def test_the_users_allocator_settings_win(fake_glibc, monkeypatch, name, value):
    from polypseg.core.devices import keep_freed_cpu_memory

    monkeypatch.setenv(name, value)
    assert not keep_freed_cpu_memory() and fake_glibc.calls == []


def test_nothing_is_set_off_glibc(fake_glibc, monkeypatch):
    import platform

    from polypseg.core.devices import keep_freed_cpu_memory

    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert not keep_freed_cpu_memory() and fake_glibc.calls == []


def test_library_calls_leave_the_allocator_alone(monkeypatch):
    """A training step and Grad-CAM built in a notebook or a server do not change the process's malloc."""
    from polypseg.core import devices
    from polypseg.explain import gradcam
    from polypseg.models.factory import create_model
    from polypseg.training import loop

    from helpers import tiny_config

    calls = []
    monkeypatch.setattr(devices, "keep_freed_cpu_memory", lambda: calls.append(1))
    for module in (loop, gradcam):
        assert not hasattr(module, "keep_freed_cpu_memory")  # not imported, so not called
    loop.TrainStep(tiny_config(image_size=32), torch.device("cpu"))
    with gradcam.SegmentationGradCAM(create_model(tiny_config().model).eval()):
        pass
    assert calls == []


@pytest.mark.parametrize(("device", "expected"), [("cpu", [1]), ("auto", [1] if not torch.cuda.is_available() else [])])
def test_the_cli_keeps_freed_memory_on_a_cpu(monkeypatch, device, expected):
    from polypseg.cli.common import keep_freed_memory_on_cpu
    from polypseg.core import devices

    calls = []
    monkeypatch.setattr(devices, "keep_freed_cpu_memory", lambda: calls.append(1))
    keep_freed_memory_on_cpu(device)
    keep_freed_memory_on_cpu("cuda:7")  # not a device here: the command names it, nothing is set
    assert calls == expected


def test_training_and_explain_commands_opt_in(monkeypatch, tmp_path):
    """polypseg train, cv and explain turn the setting on before their work starts."""
    from typer.testing import CliRunner

    from polypseg.cli.main import app
    from polypseg.core import devices

    calls = []
    monkeypatch.setattr(devices, "keep_freed_cpu_memory", lambda: calls.append("set"))
    # stop each command right after the opt-in: its library call fails on a missing dataset
    missing = str(tmp_path / "no-such-data")
    for args in (
        ["train", "--out", str(tmp_path / "t"), "--data", missing, "--recipe", "demo", "--device", "cpu"],
        ["cv", "--out", str(tmp_path / "c"), "--data", missing, "--recipe", "demo", "--device", "cpu"],
        ["explain", missing, "--out", str(tmp_path / "e"), "--device", "cpu"],
    ):
        calls.clear()
        CliRunner().invoke(app, args)
        assert calls == ["set"], args


_FAULTS_SCRIPT = """
import resource, sys, torch
from polypseg.core.devices import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(n << 20, dtype=torch.uint8) for n in (40, 64, 80)]  # above glibc's largest mmap threshold
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[step() for _ in range(10)])
"""


@pytest.mark.skipif(
    __import__("platform").libc_ver()[0] != "glibc" or not __import__("sys").platform.startswith("linux"),
    reason="glibc's malloc on Linux",
)
def test_large_blocks_freed_are_reused_without_page_faults():
    """The same 184 MiB allocated, written and freed ten times, as a training step does: glibc faults
    in all 47k pages every time; kept, the heap is reused (now and then one block is placed anew,
    as worker threads' small allocations shift the heap, so the measure is the total)."""
    import subprocess
    import sys

    from polypseg.core.devices import environment_without_allocator_choice

    env = environment_without_allocator_choice()

    def faults(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return [int(n) for n in out.stdout.split()]

    glibc, kept = faults("glibc"), faults("keep")
    assert min(glibc) > 40_000
    assert sum(kept[1:]) < 0.3 * sum(glibc[1:]) and min(kept) == 0
