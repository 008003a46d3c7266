"""Inference engines side by side: torch fp32/bf16, onnxruntime fp32/int8, OpenVINO fp32/bf16/int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from polypseg.core import precision
from polypseg.experiments import bench
from polypseg.inference.predictor import Predictor, PredictorError

from helpers import block_import


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> Path:
    # Shared with other engine tests: every ONNX engine here reads its one export from the run's cache.
    return tiny_checkpoint


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(checkpoint, images) -> np.ndarray:
    return Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch", precision="fp32").predict_resized(
        images
    )


def test_torch_predictor_reports_and_uses_its_precision(checkpoint, images, reference):
    fp32 = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch", precision="fp32")
    bf16 = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    out = bf16.predict_resized(images)
    assert out.dtype == reference.dtype and not np.array_equal(out, reference)
    assert np.abs(out - reference).mean() < 0.02 and np.abs(out - reference).max() < 0.1


def test_openvino_matches_torch(checkpoint, images, reference):
    pytest.importorskip("openvino")
    fp32 = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino", precision="fp32")
    assert fp32.backend == "openvino" and fp32.precision == "fp32"
    assert np.abs(fp32.predict_resized(images) - reference).max() < 1e-4
    bf16 = Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino", precision="bf16")
    assert bf16.precision == "bf16"
    assert np.abs(bf16.predict_resized(images) - reference).mean() < 0.02
    ensemble_checked = Predictor.from_openvino([fp32.metadata["onnx"][0]] * 2, precision="fp32")
    assert ensemble_checked.n_models == 2


@pytest.mark.parametrize(("installed", "label"), [(True, "OpenVINO"), (False, "onnxruntime")])
def test_a_failed_export_falls_back_to_torch_and_names_the_engine(checkpoint, monkeypatch, installed, label):
    from polypseg.inference import predictor as predictor_module

    def failing_export(*args, **kwargs):
        raise RuntimeError("exporter crashed\nwith a long trace")

    monkeypatch.setattr(predictor_module, "openvino_installed", lambda: installed)
    monkeypatch.setattr(predictor_module, "_onnx_models", failing_export)
    notes: list[str] = []
    loaded = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", precision="fp32", notify=notes.append)
    assert loaded.backend == "torch"
    assert notes == [f"{label} unavailable for {checkpoint} (exporter crashed); using torch"]


def test_openvino_is_cpu_only_and_needs_the_extra(checkpoint, monkeypatch):
    with pytest.raises(PredictorError, match="runs on the CPU"):
        Predictor.from_checkpoint(checkpoint, device=torch.device("meta"), backend="openvino")
    block_import(monkeypatch, "openvino")
    with pytest.raises(PredictorError, match=r"polypseg\[openvino\]"):
        Predictor.from_checkpoint(checkpoint, device="cpu", backend="openvino")


def test_backend_all_offers_bf16_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    plain = bench.available_backends("cpu")
    assert "torch" in plain and "onnxruntime-int8" in plain and not any("bf16" in n for n in plain)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    native = bench.available_backends("cpu")
    assert "torch-bf16" in native
    assert ("openvino-bf16" in native) == ("openvino" in native)
    assert bench.available_backends("cuda") == ["torch", "torch-bf16"]


@pytest.mark.parametrize(
    "name", ["torch", "torch-bf16", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16", "openvino-int8"]
)
def test_every_bench_backend_loads_and_times(checkpoint, name, tmp_path):
    if name.startswith("openvino"):
        pytest.importorskip("openvino")
    predictor = bench.load_for_bench(checkpoint, name, device="cpu", workdir=tmp_path)
    engine, wanted = bench.BACKEND_SPECS[name]
    assert predictor.backend == engine and predictor.precision == wanted
    row = bench.benchmark(predictor, batch_size=1, warmup=1, repeats=2, pipeline="end-to-end")
    assert row["precision"] == wanted and row["images_per_s"] > 0


def test_an_openvino_that_cannot_load_counts_as_not_installed(monkeypatch):
    """A present but broken OpenVINO (a missing shared library) must send ``auto`` to onnxruntime
    before any export, not fail after one."""
    import builtins
    import importlib.util

    from polypseg.experiments.bench import available_backends
    from polypseg.inference.predictor import openvino_installed

    assert openvino_installed() == (importlib.util.find_spec("openvino") is not None)
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise OSError("libopenvino.so.2540: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    assert openvino_installed() is False
    assert not any(name.startswith("openvino") for name in available_backends("cpu"))
