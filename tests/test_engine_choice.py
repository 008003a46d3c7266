"""The backend choice of Predictor.from_checkpoint as a table: every combination it accepts and each refusal."""

from __future__ import annotations

import pytest

from polypseg.inference.loading import BACKENDS, EngineChoice, EngineRequest, PredictorError, choose_engine
from polypseg.inference.predictor import ENGINES

AUTO_CPU = EngineChoice("onnxruntime", prefer_int8=True, fallback="torch")
AUTO_CPU_OPENVINO = EngineChoice("openvino", prefer_int8=True, fallback="torch")

# (backend, device, compile, openvino installed, precision, ONNX model, fold) -> engine chosen
CHOICES = [
    ("auto", "cpu", False, False, "auto", False, False, AUTO_CPU),
    ("auto", "cpu", False, True, "auto", False, False, AUTO_CPU_OPENVINO),
    ("auto", "cpu", False, True, "bf16", False, False, EngineChoice("openvino", fallback="torch")),
    ("auto", "cpu", False, False, "fp32", False, False, EngineChoice("onnxruntime", fallback="torch")),
    # bf16 asked for without OpenVINO: torch, the one other engine that computes in bf16
    ("auto", "cpu", False, False, "bf16", False, False, EngineChoice("torch")),
    ("auto", "cpu", True, True, "auto", False, False, EngineChoice("torch")),
    ("auto", "cuda:0", False, True, "auto", False, False, EngineChoice("torch")),
    ("auto", "cuda", False, False, "bf16", False, True, EngineChoice("torch")),
    ("torch", "cpu", True, True, "auto", False, False, EngineChoice("torch")),
    ("torch", "cuda:1", False, False, "fp32", False, True, EngineChoice("torch")),
    ("onnxruntime", "cpu", False, True, "auto", False, True, EngineChoice("onnxruntime")),
    ("onnxruntime", "cuda:0", False, False, "auto", False, False, EngineChoice("onnxruntime")),
    ("openvino", "cpu", False, False, "bf16", False, False, EngineChoice("openvino")),
    # an exported model runs as it is: never exported again, never int8 by choice, never torch;
    # on OpenVINO where installed, as checkpoints do
    ("auto", "cpu", False, True, "auto", True, False, EngineChoice("openvino")),
    ("auto", "cpu", False, True, "bf16", True, False, EngineChoice("openvino")),
    ("auto", "cpu", False, False, "auto", True, False, EngineChoice("onnxruntime")),
    ("onnxruntime", "cpu", False, True, "auto", True, False, EngineChoice("onnxruntime")),
    ("auto", "cuda:0", False, False, "auto", True, False, EngineChoice("onnxruntime")),
    ("onnxruntime", "cpu", False, False, "fp32", True, False, EngineChoice("onnxruntime")),
    ("openvino", "cpu", False, True, "bf16", True, False, EngineChoice("openvino")),
]

REFUSALS = [
    ("tensorrt", "cpu", False, False, "auto", False, False, "unknown backend 'tensorrt'; choose one of: " + ", ".join(BACKENDS)),
    ("torch", "cpu", False, False, "auto", True, False, "m.onnx is an ONNX model: use backend 'onnxruntime', 'openvino' or 'auto'"),
    ("torch", "cpu", True, False, "auto", True, True, "m.onnx is an ONNX model: use backend 'onnxruntime', 'openvino' or 'auto'"),
    ("auto", "cpu", False, False, "auto", True, True, "m.onnx is one ONNX model: fold and compile apply to checkpoints and run folders"),
    ("onnxruntime", "cpu", True, False, "auto", True, False, "m.onnx is one ONNX model: fold and compile apply to checkpoints and run folders"),
    ("openvino", "cuda:0", False, True, "auto", True, False, "the openvino backend runs on the CPU, not cuda:0"),
    ("openvino", "meta", False, True, "auto", False, False, "the openvino backend runs on the CPU, not meta"),
    ("onnxruntime", "cpu", True, False, "auto", False, False, "compile applies to the torch backend, not onnxruntime"),
    ("openvino", "cpu", True, True, "auto", False, False, "compile applies to the torch backend, not openvino"),
    ("onnxruntime", "cpu", False, True, "bf16", False, False, "precision bf16: onnxruntime computes in fp32; use backend 'openvino' or 'auto'"),
    ("onnxruntime", "cpu", False, True, "bf16", True, False, "precision bf16: onnxruntime computes in fp32; use backend 'openvino' or 'auto'"),
    ("auto", "cpu", False, False, "bf16", True, False, "precision bf16: m.onnx runs in bf16 on OpenVINO only (pip install 'polypseg[openvino]')"),
]  # fmt: skip


def _request(backend, device, compile, openvino, precision, onnx, fold) -> EngineRequest:
    return EngineRequest(
        backend=backend,
        device=device,
        compile=compile,
        openvino_installed=openvino,
        precision=precision,
        onnx_model=onnx,
        fold=fold,
        model="m.onnx",
    )


@pytest.mark.parametrize(("backend", "device", "compile", "openvino", "precision", "onnx", "fold", "expected"), CHOICES)
def test_the_engine_chosen_for_each_request(backend, device, compile, openvino, precision, onnx, fold, expected):
    assert choose_engine(_request(backend, device, compile, openvino, precision, onnx, fold)) == expected


@pytest.mark.parametrize(("backend", "device", "compile", "openvino", "precision", "onnx", "fold", "message"), REFUSALS)
def test_each_combination_that_cannot_run_is_refused_in_one_line(
    backend, device, compile, openvino, precision, onnx, fold, message
):
    with pytest.raises(PredictorError) as raised:
        choose_engine(_request(backend, device, compile, openvino, precision, onnx, fold))
    assert str(raised.value) == message


def test_every_engine_the_choice_can_name_is_registered():
    named = {choice.engine for *_, choice in CHOICES} | {c.fallback for *_, c in CHOICES if c.fallback}
    assert named == set(ENGINES) == set(BACKENDS) - {"auto"}
    assert [name for name, engine in ENGINES.items() if engine.runs_onnx] == ["onnxruntime", "openvino"]


def test_a_model_source_holds_what_every_engine_needs(tmp_path):
    from polypseg.inference.loading import resolve_source

    from helpers import save_tiny_checkpoint

    weights = save_tiny_checkpoint(tmp_path)
    source = resolve_source(weights, threshold=None)
    assert source.checkpoints == (weights,) and not source.is_onnx and source.onnx == ()
    assert (source.image_size, source.threshold) == (32, 0.5)
    assert source.metadata["checkpoints"] == [str(weights)] and source.metadata["config"]["train"]["image_size"] == 32
    assert resolve_source(weights, threshold=0.3).threshold == 0.3
    onnx = resolve_source(tmp_path / "m.onnx", fold=2, threshold=0.4)  # read later, by the engine, from its sidecar
    assert (onnx.is_onnx, onnx.onnx, onnx.threshold, onnx.checkpoints) == (True, (tmp_path / "m.onnx",), 0.4, ())
    with pytest.raises(PredictorError, match="--fold 1: .* has folds"):
        resolve_source(weights, fold=1)
