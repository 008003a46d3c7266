"""Runners, one per engine: a normalised ``(N, 3, S, S)`` batch on the predictor's device -> probabilities
``(N, 1, S, S)`` float32. A :class:`~polypseg.inference.predictor.Predictor` averages its runners' outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from polypseg.inference.inferer import Runner, probability_runner, use_precision_layout
from polypseg.inference.loading import PredictorError
from polypseg.inference.openvino_engine import OpenVINOError, StaticShapeModel


def torch_runner(model: nn.Module, device: torch.device, compile_mode: str | None, precision: str = "auto") -> Runner:
    """The core's probability runner for a model a predictor owns (made channels-last where the rule says),
    compiled with ``torch.compile`` in ``compile_mode`` if given."""
    from polypseg.core.precision import resolve_precision

    precision = resolve_precision(precision, device)
    cuda = device.type == "cuda"
    channels_last = use_precision_layout(model, device, precision)
    if not compile_mode:
        return probability_runner(model, device, precision, channels_last)
    probabilities = probability_runner(model, device, precision)

    # One graph per batch size (dynamic=False). "reduce-overhead" and "max-autotune" replay CUDA
    # graphs, which is what makes batch-1 latency launch-free; sigmoid and the cast are fused in.
    compiled = torch.compile(probabilities, mode=compile_mode, dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        # clone: a CUDA-graph output lives in a pool the next replay overwrites
        return compiled(x).clone()

    return run


def onnx_runner(session: Any) -> Runner:
    """An onnxruntime session of an exported model (normalised input -> probabilities)."""
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {input_name: x.detach().cpu().numpy().astype(np.float32, copy=False)})[0]
        return torch.from_numpy(out).to(x.device)

    return run


def openvino_runner(model: StaticShapeModel) -> Runner:
    """An OpenVINO model (the same exported ONNX graph: normalised input -> probabilities), compiled per batch size."""

    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            result = model.infer(x.detach().cpu().numpy())
        except OpenVINOError as error:
            raise PredictorError(str(error)) from None
        return torch.from_numpy(np.array(result[0], dtype=np.float32, copy=True)).to(x.device)

    return run
