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
