"""OpenVINO's static-shape runner: one compilation per input shape, same outputs as the dynamic graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from polypseg.inference.predictor import Predictor, PredictorError

ov = pytest.importorskip("openvino")

from polypseg.inference.openvino_engine import OpenVINOError, StaticShapeModel, openvino_config  # noqa: E402


@pytest.fixture(scope="module")
def onnx_path(tiny_checkpoint: Path) -> Path:
    """The shared tiny checkpoint's export (made once a run, in the run's cache folder), as prediction uses it."""
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", backend="openvino", precision="fp32")
    return Path(predictor.metadata["onnx"][0])


def _batch(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 32, 32)).astype(np.float32)


def test_each_batch_size_compiles_once_and_matches_the_dynamic_graph(onnx_path):
    model = StaticShapeModel(onnx_path, openvino_config("fp32"))
    assert model.compiled_shapes == [(1, 3, 32, 32)]  # compiled in the constructor
    dynamic = ov.Core().compile_model(str(onnx_path), "CPU", openvino_config("fp32")).create_infer_request()
    for n in (3, 1, 3):
        x = _batch(n)
        static_out = np.array(model.infer(x)[0])
        assert static_out.shape == (n, 1, 32, 32)
        np.testing.assert_allclose(static_out, dynamic.infer({0: x})[0], atol=1e-5)
    assert sorted(model.compiled_shapes) == [(1, 3, 32, 32), (3, 3, 32, 32)]


def test_outputs_are_indexable_by_name(onnx_path):
    result = StaticShapeModel(onnx_path, openvino_config("fp32")).infer(_batch(2))
    np.testing.assert_array_equal(result["probability"], result[0])


def test_the_least_recently_used_shape_is_dropped(onnx_path):
    model = StaticShapeModel(onnx_path, openvino_config("fp32"), first_batch=None, max_shapes=2)
    assert model.compiled_shapes == []
    for n in (1, 2, 1, 3):
        model.infer(_batch(n))
    assert model.compiled_shapes == [(1, 3, 32, 32), (3, 3, 32, 32)]


def test_a_non_contiguous_input_gives_the_same_result(onnx_path):
    model = StaticShapeModel(onnx_path, openvino_config("fp32"))
    x = _batch(2)
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # NCHW view of NHWC memory
    assert not channels_last.flags.c_contiguous
    np.testing.assert_array_equal(np.array(model.infer(channels_last)[0]), np.array(model.infer(x)[0]))


def test_a_graph_openvino_cannot_read_is_refused_by_name(tmp_path):
    bad = tmp_path / "broken model.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(OpenVINOError, match="broken model.onnx"):
        StaticShapeModel(bad, openvino_config("fp32"))
    with pytest.raises(PredictorError, match="broken model.onnx"):
        Predictor.from_openvino(bad, precision="fp32")
