"""OpenVINO on the CPU: an exported graph compiled once per input shape, with that shape fixed.

The exported ONNX graphs have a dynamic batch dimension, so one file serves any batch. OpenVINO's
CPU plugin runs the int8 graph faster with its input shape static (the shipped U-Net/ResNet-34 at
256 px on a 2-core Xeon with AMX: 1.12x at batch 1, 1.06x at batch 16; bf16 the same either way;
``python benchmarks/cpu_checks.py openvino-shape``, docs/benchmarks.md), and compiling one takes
well under a second. So each input shape is compiled on first use and kept, a few at most: a
predictor sees its batch size and the last, shorter batch; a video or a server sees batch 1.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from polypseg.errors import PolypsegError

# Compiled shapes kept per model; the least recently used goes first. Each holds its own copy of
# the weights (about 25 MB in int8, 50 MB in bf16), so the cap bounds the memory.
MAX_COMPILED_SHAPES = 4


class OpenVINOError(PolypsegError):
    """OpenVINO cannot read or compile an exported graph."""


def require_openvino(what: str) -> None:
    """Raise a one-line :class:`OpenVINOError` naming the optional extra when OpenVINO is not
    installed (``what``: who needs it), before any file is read."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise OpenVINOError(f"{what} needs OpenVINO: pip install 'polypseg[openvino]'") from None


def openvino_config(precision: str, threads: int | None = None) -> dict[str, Any]:
    """The CPU plugin's settings for ``precision`` (``bf16`` or ``fp32``; a QDQ int8 graph runs in int8 either way)."""
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class StaticShapeModel:
    """An ONNX graph for OpenVINO's CPU plugin, compiled per input shape (see the module docstring).

    The graph must have one input. Batch ``first_batch`` is compiled in the constructor (when the
    graph's other input dimensions are fixed, as in every polypseg export), so a graph OpenVINO
    cannot compile is refused there, by file name. One instance serves one thread at a time: each
    shape has one infer request, whose output buffers the next call of that shape overwrites.
    """

    def __init__(
        self,
        path: Path | str,
        config: dict[str, Any],
        first_batch: int | None = 1,
        max_shapes: int = MAX_COMPILED_SHAPES,
    ) -> None:
        import openvino as ov

        self.path, self.config, self.max_shapes = Path(path), dict(config), max(1, max_shapes)
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(str(self.path))
        except Exception as error:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise OpenVINOError(f"OpenVINO cannot read {self.path}: {_first_line(error)}") from None
        if len(self._model.inputs) != 1:
            raise OpenVINOError(f"{self.path}: expected a graph with one input, found {len(self._model.inputs)}")
        self._requests: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        dims = self._model.input(0).get_partial_shape()
        rest = list(dims)[1:] if dims.rank.is_static else []
        if first_batch is not None and rest and all(d.is_static for d in rest):
            self._request((first_batch, *(d.get_length() for d in rest)))

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        """The input shapes compiled now, least recently used first."""
        return list(self._requests)

    def _request(self, shape: tuple[int, ...]) -> Any:
        request = self._requests.get(shape)
        if request is not None:
            self._requests.move_to_end(shape)
            return request
        model = self._model.clone()
        try:
            model.reshape({0: list(shape)})
            compiled = self._core.compile_model(model, "CPU", self.config)
        except Exception as error:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise OpenVINOError(
                f"OpenVINO cannot compile {self.path} for input {shape}: {_first_line(error)}"
            ) from None
        request = compiled.create_infer_request()
        self._requests[shape] = request
        while len(self._requests) > self.max_shapes:
            self._requests.popitem(last=False)
        return request

    def infer(self, array: np.ndarray) -> Any:
        """Run the graph on ``array`` (float32); returns OpenVINO's result, indexable by output index or name."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        return self._request(tuple(array.shape)).infer({0: array})


def _first_line(error: BaseException) -> str:
    """The first line that says something: OpenVINO opens its messages with lines naming its own
    source files ("Exception from src/inference/src/cpp/core.cpp:84:")."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    useful = [line for line in lines if line and not line.startswith("Exception from src/")]
    return useful[0] if useful else (lines[0] if lines and lines[0] else type(error).__name__)
