"""The paper's Grad-CAM on forward-only CPU engines (onnxruntime, OpenVINO): no backward pass.

:class:`polypseg.explain.gradcam.SegmentationGradCAM` backpropagates through PyTorch. The faster CPU
engines cannot backpropagate, but for the paper's Grad-CAM they need not: the layer explained is
the input ``A`` of smp's ``SegmentationHead``, which is one ``Conv2d`` followed by identities, and
every target used (:class:`~polypseg.explain.gradcam.MaskedLogitSum`, :class:`~polypseg.explain.gradcam.RegionLogitSum`,
:class:`~polypseg.explain.gradcam.WholeLogitSum`) is a sum of logits over a region ``R`` that is constant
for the gradient (the thresholded prediction is detached, exactly as autograd treats it). The
target is then linear in ``A``, and its gradient is exact in closed form::

    dT/dA = conv_transpose2d(R, W_head, padding)            # (N, C, H, W)

and the Grad-CAM channel weights (the spatial mean of that gradient) are even cheaper: a 3x3
kernel-weighted sum of nine window sums of ``R`` (:func:`gradcam_channel_weights`). So one forward
pass returning both the logits and ``A`` is all an engine has to run: the model is exported to
ONNX with those two outputs (:func:`export_gradcam_onnx`).

>>> with EngineGradCAM(model, engine="openvino", precision="bf16", image_size=256) as cam:
...     heatmaps, logits = cam(images, return_logits=True)   # as SegmentationGradCAM returns them

Only ``method="gradcam"`` at the head's input layer (the paper's default, ``decoder.final``) is
supported; anything else is refused with :class:`EngineGradCAMError`. The small head arithmetic
runs in fp32 PyTorch whatever the engine's precision.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polypseg.explain.gradcam import (
    DEFAULT_LAYER,
    ExplainError,
    MaskedLogitSum,
    RegionLogitSum,
    WholeLogitSum,
    normalize_heatmaps,
    resolve_layer,
)

ENGINES = ("onnxruntime", "openvino")
ENGINE_PRECISIONS = ("auto", "fp32", "bf16", "int8")
OUTPUT_NAMES = ("logits", "features")
INPUT_NAME = "image"

log = logging.getLogger(__name__)

# (images float32 (N, 3, H, W)) -> (logits (N, 1, H, W), head input features (N, C, H, W)), float32 numpy
EngineRunner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class EngineGradCAMError(ExplainError):
    """A model, layer, target, method or engine that the forward-only Grad-CAM cannot serve."""


# ---------------------------------------------------------------------------------------------
# The head: what makes the closed-form gradient exact


def linear_head_conv(model: nn.Module) -> nn.Conv2d:
    """The head's ``Conv2d`` if ``model.segmentation_head`` is exactly one same-size, single-output
    ``Conv2d`` followed by identities (smp's default head without upsampling or activation).

    Raises :class:`EngineGradCAMError` otherwise: only then is the logit linear in the head's
    input, with a gradient computable without backpropagation.
    """
    head = getattr(model, "segmentation_head", None)
    if not isinstance(head, nn.Module):
        raise EngineGradCAMError("forward-only Grad-CAM needs an smp-style model with a segmentation_head")
    if getattr(model, "classification_head", None) is not None:
        raise EngineGradCAMError("forward-only Grad-CAM does not support models with an auxiliary classification head")
    parts = list(head.children()) if isinstance(head, nn.Sequential) else [head]
    conv, rest = (parts[0], parts[1:]) if parts else (None, [])
    if not isinstance(conv, nn.Conv2d) or not all(_is_identity(part) for part in rest):
        raise EngineGradCAMError(
            f"forward-only Grad-CAM needs a segmentation head that is one Conv2d followed by identities, not {_describe(head)}"
        )
    kernel, padding = tuple(conv.kernel_size), conv.padding
    same_size = isinstance(padding, tuple) and all(2 * p == k - 1 for p, k in zip(padding, kernel, strict=False))
    if (
        conv.out_channels != 1
        or tuple(conv.stride) != (1, 1)
        or tuple(conv.dilation) != (1, 1)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
        or not same_size
    ):
        raise EngineGradCAMError(
            "forward-only Grad-CAM needs a head Conv2d with one output channel, stride 1, no dilation or "
            f"groups and zero 'same' padding; got {conv}"
        )
    return conv


def _is_identity(module: nn.Module) -> bool:
    if isinstance(module, nn.Identity):
        return True
    inner = getattr(module, "activation", None)  # smp's Activation wrapper
    return type(module).__name__ == "Activation" and isinstance(inner, nn.Identity)


def _describe(module: nn.Module) -> str:
    return " -> ".join(type(m).__name__ for m in module.children()) or type(module).__name__


def check_layer_is_head_input(model: nn.Module, layer: str | nn.Module = DEFAULT_LAYER, probe_size: int = 64) -> None:
    """Refuse any Grad-CAM layer whose output is not the segmentation head's input.

    Checked on one forward pass of a zero image of ``probe_size`` px: the layer's output tensor and
    the tensor the head receives must be the same object.
    """
    linear_head_conv(model)
    tap = resolve_layer(model, layer)
    seen: dict[str, torch.Tensor] = {}

    def layer_hook(module: nn.Module, inputs: object, output: object) -> None:
        seen["layer"] = output if tap.index is None else output[tap.index]  # type: ignore[index]

    def head_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen["head"] = inputs[0]

    handles = [
        tap.module.register_forward_hook(layer_hook),
        model.segmentation_head.register_forward_pre_hook(head_hook),  # type: ignore[union-attr]
    ]
    was_training = model.training
    try:
        parameter = next(model.parameters(), None)
        probe = torch.zeros(1, 3, probe_size, probe_size, device=parameter.device if parameter is not None else "cpu")
        with torch.no_grad():
            model.eval()(probe)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if seen.get("layer") is None or seen.get("layer") is not seen.get("head"):
        raise EngineGradCAMError(
            f"forward-only Grad-CAM explains only the segmentation head's input (layer '{DEFAULT_LAYER}'), not '{layer}'"
        )


# ---------------------------------------------------------------------------------------------
# Closed-form gradient of a region sum of logits
#
# No forward-only engine backpropagates; the head is linear in its input, so the gradient of a sum
# of logits over a fixed region is exact in closed form (the transpose of the head convolution
# applied to the region), and Grad-CAM needs only its spatial mean.


def region_logit_gradient(region: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """``dT/dA (N, C, H, W)`` for ``T_n = sum_p R_n(p) logits_n(p)``, ``logits = conv2d(A, W) + b``.

    ``region``: ``(N, 1, H, W)`` 0/1 (or any weights); ``head_weight``: ``(1, C, kh, kw)`` with
    'same' zero padding. The bias does not enter the gradient.
    """
    padding = (head_weight.shape[-2] // 2, head_weight.shape[-1] // 2)
    return F.conv_transpose2d(region.to(head_weight.dtype), head_weight, padding=padding)


def gradcam_channel_weights(region: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """Grad-CAM weights ``(N, C)``: the spatial mean of :func:`region_logit_gradient`, without forming it.

    Summed over positions, ``conv_transpose2d(R, W)`` is ``sum_{i,j} W[0, c, i, j] * S_n[i, j]``,
    where ``S_n[i, j]`` is the sum of ``R_n`` over the positions whose kernel tap ``(i, j)`` lands
    inside the image (all but one border row/column per unit of offset).
    """
    n, _, height, width = region.shape
    kh, kw = head_weight.shape[-2:]
    ph, pw = kh // 2, kw // 2
    values = region[:, 0].to(head_weight.dtype)
    window_sums = torch.empty(n, kh, kw, dtype=head_weight.dtype, device=region.device)
    for i in range(kh):
        dy = i - ph
        rows = values[:, max(0, -dy) : height - max(0, dy)]
        for j in range(kw):
            dx = j - pw
            window_sums[:, i, j] = rows[:, :, max(0, -dx) : width - max(0, dx)].sum(dim=(1, 2))
    return torch.einsum("nij,cij->nc", window_sums, head_weight[0]) / (height * width)


def target_region(target: object, logits: torch.Tensor) -> torch.Tensor:
    """The constant region ``(N, 1, H, W)`` float of a region-sum target, from the engine's logits.

    :class:`MaskedLogitSum` thresholds ``sigmoid(logits)`` as it does in PyTorch; other targets
    (arbitrary callables) have no closed-form gradient and are refused.
    """
    n, _, height, width = logits.shape
    if isinstance(target, MaskedLogitSum):
        return (torch.sigmoid(logits.float()) >= target.threshold).float()
    if isinstance(target, WholeLogitSum):
        return torch.ones(n, 1, height, width, dtype=torch.float32, device=logits.device)
    if isinstance(target, RegionLogitSum):
        region = torch.as_tensor(target.region, device=logits.device).bool()
        if region.dim() == 2:
            region = region.unsqueeze(0)
        if region.dim() != 3 or tuple(region.shape[-2:]) != (height, width):
            raise EngineGradCAMError(
                f"region of shape {tuple(region.shape)} does not fit logits of shape {tuple(logits.shape)}; "
                "give (H, W) or (N, H, W) at the model's input size"
            )
        if region.shape[0] not in (1, n):
            raise EngineGradCAMError(f"region has {region.shape[0]} masks for a batch of {n} images")
        return region.unsqueeze(1).expand(n, 1, height, width).float()
    raise EngineGradCAMError(
        f"forward-only Grad-CAM supports MaskedLogitSum, RegionLogitSum and WholeLogitSum targets, not {type(target).__name__}"
    )


def gradcam_from_features(
    features: torch.Tensor, logits: torch.Tensor, head_weight: torch.Tensor, target: object, size: Sequence[int]
) -> torch.Tensor:
    """Heatmaps ``float32 (N, H, W)`` in [0, 1] from one forward pass's head input and logits,
    computed as :class:`polypseg.explain.gradcam.SegmentationGradCAM` does (ReLU, bilinear to ``size``, / max)."""
    features = features.float()
    region = target_region(target, logits)
    weights = gradcam_channel_weights(region, head_weight.float())
    cam = torch.einsum("nc,nchw->nhw", weights, features).clamp(min=0).unsqueeze(1)
    if tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    return normalize_heatmaps(cam[:, 0])


# ---------------------------------------------------------------------------------------------
# Export: one graph, two outputs


class LogitsAndHeadInput(nn.Module):
    """``x -> (logits, head input)`` for an smp segmentation model (its forward, minus the shape check)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.decoder(self.model.encoder(x))  # type: ignore[operator]
        return self.model.segmentation_head(features), features  # type: ignore[operator]


def export_gradcam_onnx(
    model: nn.Module,
    path: Path | str,
    image_size: int = 256,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` to ONNX with input ``image`` and outputs ``logits`` and ``features`` (the head input).

    Same exporter settings as :mod:`polypseg.inference.export` (opset :data:`polypseg.inference.export.DEFAULT_OPSET`,
    torch.export-based exporter with a dynamic batch axis, the TorchScript exporter if that fails).
    The model is exported in eval mode and its training flag restored afterwards.
    """
    from polypseg.inference.export import DEFAULT_OPSET, ExportError, _export_graph

    linear_head_conv(model)
    path = Path(path)
    opset = opset or DEFAULT_OPSET
    wrapper = LogitsAndHeadInput(model)
    was_training = model.training
    wrapper.eval()
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        _export_graph(wrapper, image_size, path, opset, dynamic_batch, output_names=OUTPUT_NAMES, device=device)
    except Exception as error:  # noqa: BLE001 - both exporters failed: one line for the user
        raise ExportError(f"cannot export the model for forward-only Grad-CAM: {str(error).splitlines()[0]}") from None
    finally:
        model.train(was_training)
    return path


# ---------------------------------------------------------------------------------------------
# Engines


def onnxruntime_runner(onnx_path: Path | str, threads: int | None = None) -> EngineRunner:
    """Run the two-output graph in onnxruntime (CPU; fp32, or int8 for a QDQ-quantized graph)."""
    from polypseg.inference.export import create_session

    session = create_session(onnx_path, "cpu", threads)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return logits, features

    return run


def openvino_runner(onnx_path: Path | str, precision: str = "fp32", threads: int | None = None) -> EngineRunner:
    """Run the two-output graph in OpenVINO on the CPU, compiled per batch size
    (:class:`polypseg.inference.openvino_engine.StaticShapeModel`, as
    :meth:`polypseg.inference.predictor.Predictor.from_openvino` runs it); ``precision`` ``bf16`` sets
    ``INFERENCE_PRECISION_HINT`` (a QDQ graph runs in int8 whatever is asked)."""
    from polypseg.inference.openvino_engine import OpenVINOError, StaticShapeModel, openvino_config, require_openvino

    try:
        require_openvino("the openvino engine")
        model = StaticShapeModel(onnx_path, openvino_config(precision, threads))
    except OpenVINOError as error:
        raise EngineGradCAMError(str(error)) from None

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            result = model.infer(images)
        except OpenVINOError as error:
            raise EngineGradCAMError(str(error)) from None
        # The request reuses its output buffers: the caller finishes with them before the next call.
        return result[OUTPUT_NAMES[0]], result[OUTPUT_NAMES[1]]

    return run


class EngineGradCAM:
    """The paper's Grad-CAM (:class:`polypseg.explain.gradcam.SegmentationGradCAM`, ``method="gradcam"``) from
    forward passes only, in onnxruntime (fp32, int8) or OpenVINO (fp32, bf16, int8) on the CPU.

    ``model``: an smp model whose head is one Conv2d + identities (else :class:`EngineGradCAMError`),
    in eval mode, on any device. It is exported once at ``image_size`` (to ``onnx_path`` if given,
    else to a temporary file) and only its head weight is kept; ``export=False`` loads an existing
    :func:`export_gradcam_onnx` file of this same model from ``onnx_path`` instead (to build several
    engines from one export; for ``int8``, a graph already quantized by :func:`quantize_gradcam_onnx`
    is used as it is).

    ``precision``: ``fp32``; ``bf16`` (OpenVINO, on CPUs with native bf16); ``int8`` (static QDQ
    quantization calibrated on ``calibration_images``: a folder or a list of paths / ``uint8``
    arrays, as :func:`polypseg.inference.export.quantize_onnx_int8` takes; the gradient then uses the fp32 head
    weight, exact for the fp32 graph and close for the quantized one); or ``auto`` (bf16 where
    native for OpenVINO, fp32 otherwise). One instance serves one thread at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        engine: str = "onnxruntime",
        precision: str = "fp32",
        image_size: int = 256,
        layer: str | nn.Module = DEFAULT_LAYER,
        method: str = "gradcam",
        onnx_path: Path | str | None = None,
        export: bool = True,
        calibration_images: Path | str | Sequence[Any] | None = None,
        threads: int | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise EngineGradCAMError(f"unknown engine '{engine}'; choose one of: {', '.join(ENGINES)}")
        if method != "gradcam":
            raise EngineGradCAMError(
                f"forward-only Grad-CAM computes method 'gradcam' only, not '{method}'; use SegmentationGradCAM"
            )
        self.engine = engine
        self.precision = resolve_engine_precision(engine, precision)
        reuse_int8 = (
            self.precision == "int8" and not export and onnx_path is not None and _is_quantized(Path(onnx_path))
        )
        if self.precision == "int8" and calibration_images is None and not reuse_int8:
            raise EngineGradCAMError("precision 'int8' needs calibration_images (a folder of images or a list)")
        self.image_size = int(image_size)
        check_layer_is_head_input(model, layer, probe_size=min(64, self.image_size))
        self.head_weight = linear_head_conv(model).weight.detach().float().cpu().clone()
        with tempfile.TemporaryDirectory(prefix="polypseg-gradcam-") as tmp:
            fp32_path = Path(onnx_path) if onnx_path is not None else Path(tmp) / "gradcam.onnx"
            if export:
                export_gradcam_onnx(model, fp32_path, self.image_size)
            elif onnx_path is None or not fp32_path.is_file():
                raise EngineGradCAMError(f"export=False needs an existing onnx_path, not {onnx_path}")
            graph = fp32_path
            if self.precision == "int8" and not reuse_int8:
                int8_path = (
                    Path(tmp) / "gradcam.int8.onnx" if onnx_path is None else fp32_path.with_suffix(".int8.onnx")
                )
                graph = quantize_gradcam_onnx(fp32_path, int8_path, calibration_images)
            # Both engines read the file at construction; the temporary copy may go afterwards.
            if engine == "onnxruntime":
                self._run: EngineRunner | None = onnxruntime_runner(graph, threads)
            else:
                self._run = openvino_runner(graph, self.precision, threads)

    def __enter__(self) -> EngineGradCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Drop the engine session; safe to call more than once."""
        self._run = None

    def __call__(
        self, images: torch.Tensor | np.ndarray, target: object | None = None, return_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Heatmaps ``float32 (N, H, W)`` in [0, 1] for normalised images ``(N, 3, H, W)``, as
        :meth:`SegmentationGradCAM.__call__` returns them (with ``return_logits=True``: and the
        logits ``float32 (N, 1, H, W)``). ``target`` defaults to :class:`MaskedLogitSum` at 0.5."""
        if self._run is None:
            raise EngineGradCAMError("this EngineGradCAM was released; create a new one")
        target = target if target is not None else MaskedLogitSum()
        batch = (
            images.detach().cpu().float().numpy()
            if isinstance(images, torch.Tensor)
            else np.asarray(images, np.float32)
        )
        if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[2:] != (self.image_size, self.image_size):
            raise EngineGradCAMError(
                f"images of shape {tuple(batch.shape)}: this engine was exported for (N, 3, {self.image_size}, {self.image_size})"
            )
        logits_array, features_array = self._run(np.ascontiguousarray(batch))
        logits = torch.from_numpy(np.array(logits_array, dtype=np.float32, copy=True))
        with torch.no_grad():
            heatmaps = gradcam_from_features(
                torch.from_numpy(features_array), logits, self.head_weight, target, batch.shape[-2:]
            )
        if return_logits:
            return heatmaps, logits
        return heatmaps


def resolve_engine_precision(engine: str, precision: str) -> str:
    """The precision ``engine`` computes in when ``precision`` is asked: onnxruntime fp32 (or int8),
    OpenVINO as :func:`polypseg.core.precision.resolve_precision` decides on the CPU."""
    from polypseg.core.precision import resolve_precision
    from polypseg.inference.loading import engine_precision_problem

    if precision not in ENGINE_PRECISIONS:
        raise EngineGradCAMError(f"precision '{precision}': choose one of {', '.join(ENGINE_PRECISIONS)}")
    if precision == "int8":
        return precision
    if engine == "onnxruntime":
        if engine_precision_problem(engine, precision) is not None:
            raise EngineGradCAMError("the onnxruntime engine runs fp32 or int8; use engine 'openvino' for bf16")
        return "fp32"
    return resolve_precision(precision, "cpu")


# ---------------------------------------------------------------------------------------------
# int8


def _is_quantized(onnx_path: Path) -> bool:
    from polypseg.inference.export import ExportError, read_onnx_metadata

    try:
        return onnx_path.is_file() and bool(read_onnx_metadata(onnx_path).get("quantization"))
    except ExportError:
        return False


def quantize_gradcam_onnx(
    fp32_path: Path | str,
    out_path: Path | str,
    calibration_images: Path | str | Sequence[Any] | None,
    max_images: int = 64,
) -> Path:
    """Static int8 QDQ quantization of the two-output graph with :func:`polypseg.inference.export.quantize_onnx_int8`
    (per-channel int8 weights, uint8 activations, min-max calibration on real images)."""
    from polypseg.inference.export import quantize_onnx_int8

    if calibration_images is None:
        raise EngineGradCAMError("precision 'int8' needs calibration_images (a folder of images or a list)")
    return quantize_onnx_int8(fp32_path, out_path, calibration_images, max_images=max_images)


# ---------------------------------------------------------------------------------------------
# The driver that `polypseg explain --engine` uses


def cached_gradcam_onnx(
    checkpoint: Path | str, model: nn.Module, image_size: int, cache_dir: Path | str | None = None
) -> Path:
    """The two-output Grad-CAM export of ``checkpoint``, made once and kept in the ONNX cache.

    Keyed like :func:`polypseg.inference.export.cached_onnx` (the SHA-256 of the checkpoint's content and the
    exporter's settings), plus the image size; written through :func:`polypseg.core.io_utils.atomic_write`,
    so an interrupted export never leaves a file that looks finished, and its leftovers are removed
    the next time as :func:`polypseg.inference.export.cached_onnx` removes its own.
    """
    from polypseg.core.io_utils import atomic_write, remove_stale_temps
    from polypseg.inference.export import _cache_entry, _fingerprint

    entry = _cache_entry(_fingerprint(Path(checkpoint)), cache_dir)
    target = entry.with_name(f"{entry.stem}.gradcam{int(image_size)}.onnx")
    if target.is_file():
        return target
    remove_stale_temps(target.parent)  # exports cut short by a kill
    atomic_write(target, lambda tmp: export_gradcam_onnx(model, tmp, image_size))
    return target


class EngineGradCAMDriver:
    """:class:`polypseg.explain.gradcam.GradCAMDriver`'s ``run`` on a forward-only CPU engine.

    Same input (RGB ``uint8`` images) and output (:class:`polypseg.explain.gradcam.CamBatch`, at the model's
    size) as the torch driver, so callers switch engines without other changes. The export is
    cached per checkpoint content (:func:`cached_gradcam_onnx`).
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoint: Path | str,
        engine: str,
        *,
        precision: str = "auto",
        image_size: int = 256,
        layer: str | nn.Module = DEFAULT_LAYER,
        method: str = "gradcam",
        cache_dir: Path | str | None = None,
    ) -> None:
        self.image_size = int(image_size)
        cpu_model = model if next(model.parameters()).device.type == "cpu" else _cpu_copy(model)
        path = cached_gradcam_onnx(checkpoint, cpu_model, self.image_size, cache_dir)
        self._cam = EngineGradCAM(
            cpu_model,
            engine,
            precision,
            image_size=self.image_size,
            layer=layer,
            method=method,
            onnx_path=path,
            export=False,
        )

    def __enter__(self) -> EngineGradCAMDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cam.release()

    def run(self, images: Any, target: Any = None, indices: slice | None = None) -> Any:
        from polypseg.explain.gradcam import CamBatch
        from polypseg.inference.inferer import model_input

        inputs = model_input(images, "cpu", "fp32", image_size=self.image_size)
        heatmaps, logits = self._cam(inputs, target, return_logits=True)
        return CamBatch(indices if indices is not None else slice(0, len(inputs)), inputs, heatmaps, logits)


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).float().cpu().eval()
