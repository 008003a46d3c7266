"""Grad-CAM for binary segmentation, batched: one forward and one backward per batch.

The paper's definition (PolypSeg-GradCAM; Vinogradova et al. 2020 for segmentation targets):
the target is the sum of the logits inside the model's own predicted mask, gradients go to the
last decoder feature map, channel weights are the spatially averaged gradients, and the heatmap
is the ReLU of the weighted channel sum, upsampled to the input size and divided by its maximum.

>>> with SegmentationGradCAM(model) as cam:
...     heatmaps, logits = cam(images, return_logits=True)   # (N, H, W) in [0, 1]

:class:`GradCAMDriver` is the batch loop around it that every caller uses (CLI, web service,
reports, explanation metrics, benchmarks): RGB ``uint8`` images in, heatmaps and logits out.

Targets follow pytorch-grad-cam's habit: a plain callable ``target(logits (N, 1, H, W)) -> (N,)``.
Besides Grad-CAM, the same object computes Grad-CAM++, HiResCAM and LayerCAM (from the same single
backward pass) and Score-CAM (gradient-free: one extra forward pass per channel of the layer).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polypseg.core.precision import autocast
from polypseg.errors import PolypsegError
from polypseg.inference.inferer import ImageBatch, batch_slices, model_input

Target = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("gradcam", "gradcam++", "hirescam", "layercam", "scorecam")
DEFAULT_LAYER = "decoder.final"


class ExplainError(PolypsegError):
    """A bad Grad-CAM layer, method or target."""


# ---------------------------------------------------------------------------------------------
# Targets


def _per_image_sum(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).sum(1)


@dataclass
class MaskedLogitSum:
    """Sum of the logits inside the model's own predicted mask ``sigmoid(logit) >= threshold`` (the paper's target).

    The mask is computed from the same forward pass and detached: it selects pixels, it is not
    differentiated. An image with an empty predicted mask has target 0 and an all-zero heatmap.
    """

    threshold: float = 0.5

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        mask = (torch.sigmoid(logits.detach().float()) >= self.threshold).to(logits.dtype)
        return _per_image_sum(logits * mask)


@dataclass
class WholeLogitSum:
    """Sum of every logit of the map: explains the whole output, background included."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return _per_image_sum(logits)


@dataclass
class RegionLogitSum:
    """Sum of the logits inside a user-given region, ``bool (N, H, W)`` or ``(H, W)`` at the logit size."""

    region: torch.Tensor | np.ndarray = field(repr=False)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        region = torch.as_tensor(self.region, device=logits.device).bool()
        if region.dim() == 2:
            region = region.unsqueeze(0)
        if region.dim() != 3 or tuple(region.shape[-2:]) != tuple(logits.shape[-2:]):
            raise ExplainError(
                f"region of shape {tuple(region.shape)} does not fit logits of shape {tuple(logits.shape)}; "
                "give (H, W) or (N, H, W) at the model's input size"
            )
        if region.shape[0] not in (1, logits.shape[0]):
            raise ExplainError(f"region has {region.shape[0]} masks for a batch of {logits.shape[0]} images")
        return _per_image_sum(logits * region.unsqueeze(1).to(logits.dtype))


# ---------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class _Tap:
    """Where to read the activation: a module's output, or one tensor of a module's list output."""

    module: nn.Module
    index: int | None = None


def _encoder_depth(model: nn.Module) -> int:
    encoder = model.encoder  # type: ignore[attr-defined]
    return len(getattr(encoder, "out_channels", [0] * 6)) - 1


def available_layers(model: nn.Module) -> list[str]:
    """Named Grad-CAM layers of ``model`` (any dotted module path is accepted as well)."""
    names = [DEFAULT_LAYER]
    decoder = getattr(model, "decoder", None)
    if decoder is not None and isinstance(getattr(decoder, "blocks", None), nn.ModuleList):
        names += [f"decoder.block{i}" for i in range(len(decoder.blocks))]
    if hasattr(model, "encoder"):
        encoder = model.encoder  # type: ignore[attr-defined]
        if all(hasattr(encoder, f"layer{i}") for i in range(1, 5)):
            names += [f"encoder.stage{i}" for i in range(1, 5)]
        else:
            names += [f"encoder.stage{i}" for i in range(1, _encoder_depth(model))]
        names.append("bottleneck")
    return names


def _encoder_stage(model: nn.Module, stage: int, name: str) -> _Tap:
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise ExplainError(f"layer '{name}': the model has no encoder")
    if hasattr(encoder, f"layer{stage}"):  # ResNet-style encoders: layer1..layer4
        return _Tap(getattr(encoder, f"layer{stage}"))
    # Any other smp encoder returns [input, stride 2, stride 4, ...]: stage k is stride 2**(k+1).
    depth = _encoder_depth(model)
    if not 1 <= stage + 1 <= depth:
        raise ExplainError(f"layer '{name}': the encoder has stages 1..{depth - 1}")
    return _Tap(encoder, index=stage + 1)


def resolve_layer(model: nn.Module, layer: str | nn.Module = DEFAULT_LAYER) -> _Tap:
    """Turn a layer name, dotted module path or module into the activation to explain."""
    from polypseg.models.factory import final_decoder_layer

    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ExplainError("the given layer module is not part of the model")
        return _Tap(layer)
    if layer == DEFAULT_LAYER:
        if not hasattr(model, "decoder"):
            raise ExplainError(f"layer '{layer}': the model has no decoder; give a module path")
        return _Tap(final_decoder_layer(model))
    if match := re.fullmatch(r"decoder\.block(\d+)", layer):
        blocks = getattr(getattr(model, "decoder", None), "blocks", None)
        index = int(match.group(1))
        if not isinstance(blocks, nn.ModuleList) or index >= len(blocks):
            raise ExplainError(f"layer '{layer}' not found; available: {', '.join(available_layers(model))}")
        return _Tap(blocks[index])
    if match := re.fullmatch(r"encoder\.stage(\d+)", layer):
        return _encoder_stage(model, int(match.group(1)), layer)
    if layer == "bottleneck":
        if hasattr(getattr(model, "encoder", None), "layer4"):
            return _Tap(model.encoder.layer4)  # type: ignore[attr-defined]
        return _Tap(model.encoder, index=-1)  # type: ignore[attr-defined]
    try:
        return _Tap(model.get_submodule(layer))
    except AttributeError:
        raise ExplainError(
            f"layer '{layer}' not found; use one of {', '.join(available_layers(model))} or a module path"
        ) from None


# ---------------------------------------------------------------------------------------------
# Grad-CAM


def _cam_from(activations: torch.Tensor, grads: torch.Tensor, method: str) -> torch.Tensor:
    """Un-normalised CAM ``(N, h, w)`` from activations and gradients ``(N, C, h, w)``."""
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)
        return (weights * activations).sum(1)
    if method == "hirescam":
        return (grads * activations).sum(1)
    if method == "layercam":
        return (grads.clamp(min=0) * activations).sum(1)
    if method == "gradcam++":
        # Chattopadhyay et al. 2018, eq. 19 with the exponential-output approximation (as in
        # pytorch-grad-cam), so it needs no second backward pass.
        g2 = grads.pow(2)
        denominator = 2 * g2 + activations.sum(dim=(2, 3), keepdim=True) * g2 * grads + 1e-6
        alpha = torch.where(grads != 0, g2 / denominator, torch.zeros_like(grads))
        weights = (grads.clamp(min=0) * alpha).sum(dim=(2, 3), keepdim=True)
        return (weights * activations).sum(1)
    raise ExplainError(f"unknown CAM method '{method}'; choose one of: {', '.join(METHODS)}")


def _fixed_target(target: Target, logits: torch.Tensor, index: int) -> Target:
    """Image ``index``'s target with its region frozen, for scoring other inputs (Score-CAM).

    The paper's target selects the pixels of the model's prediction on the *original* image; scored
    on a masked copy of that image, it must keep those pixels rather than re-threshold the new
    output (pytorch-grad-cam's ``SemanticSegmentationTarget`` also takes a fixed mask). Other
    callables are applied as they are.
    """
    if isinstance(target, MaskedLogitSum):
        return RegionLogitSum(torch.sigmoid(logits[index, 0].float()) >= target.threshold)
    if isinstance(target, RegionLogitSum):
        region = torch.as_tensor(target.region)
        return RegionLogitSum(region[index] if region.dim() == 3 and region.shape[0] > 1 else region)
    return target


def normalize_heatmaps(cam: torch.Tensor) -> torch.Tensor:
    """ReLU, then divide each map by its maximum; an all-zero map stays zero (no NaN)."""
    cam = cam.clamp(min=0)
    peak = cam.reshape(cam.shape[0], -1).amax(1).view(-1, *([1] * (cam.dim() - 1)))
    return torch.where(peak > 0, cam / peak.clamp(min=torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))


class SegmentationGradCAM:
    """Batched Grad-CAM for a model returning logits ``(N, 1, H, W)``.

    Hooks are registered at construction and always removed on ``__exit__`` or :meth:`release`.
    ``method`` is ``gradcam`` (default), ``gradcam++``, ``hirescam`` or ``layercam``, which share
    one backward pass, or ``scorecam`` (Wang et al. 2020), which instead runs the model once per
    channel of the layer on the input masked by that channel's normalised activation, in chunks
    of ``score_batch_size`` (cheap at the default 16-channel layer). Parameter gradients are never
    touched (``torch.autograd.grad`` is taken with respect to the activation only). One instance serves one thread at a time; separate
    instances (as :func:`explain_images` creates per call) may share a model across threads.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module = DEFAULT_LAYER,
        method: str = "gradcam",
        score_batch_size: int = 32,
    ) -> None:
        if method not in METHODS:
            raise ExplainError(f"unknown CAM method '{method}'; choose one of: {', '.join(METHODS)}")
        self.model = model
        self.method = method
        self.score_batch_size = score_batch_size
        self._tap = resolve_layer(model, layer)
        self._activation: torch.Tensor | None = None
        self._calls = 0
        # The hook only acts inside this object's own __call__, on the calling thread: forward passes
        # made meanwhile for other purposes (deletion curves, another request) pass through untouched.
        self._active_thread: int | None = None
        self._handle = self._tap.module.register_forward_hook(self._hook)

    def __enter__(self) -> SegmentationGradCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Remove the hook; safe to call more than once."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, inputs: object, output: object) -> object:
        if self._active_thread != threading.get_ident():
            return None
        self._calls += 1
        if self._calls > 1:
            raise ExplainError("the Grad-CAM layer runs more than once per forward pass; choose another layer")
        selected = output if self._tap.index is None else output[self._tap.index]  # type: ignore[index]
        if not isinstance(selected, torch.Tensor):
            raise ExplainError(f"the Grad-CAM layer returns {type(selected).__name__}, not a tensor")
        # Everything before the layer ran under no_grad (no graph, no saved tensors); from here on
        # the graph starts at a fresh leaf, which is all the backward pass needs. The clone keeps
        # the leaf out of any in-place op that follows the layer (e.g. ReLU(inplace=True)).
        torch.set_grad_enabled(True)
        leaf = selected.detach().requires_grad_(True)
        self._activation = leaf
        replaced = leaf.clone()
        if self._tap.index is None:
            return replaced
        items = list(output)  # type: ignore[call-overload]
        items[self._tap.index] = replaced
        return type(output)(items) if isinstance(output, tuple) else items

    def __call__(
        self,
        images: torch.Tensor,
        target: Target | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Heatmaps ``float32 (N, H, W)`` in [0, 1] for normalised images ``(N, 3, H, W)``.

        ``target`` defaults to :class:`MaskedLogitSum` at 0.5. With ``return_logits=True`` the
        logits ``(N, 1, H, W)`` of the same forward pass are returned too (detached).
        """
        if self._handle is None:
            raise ExplainError("this SegmentationGradCAM was released; create a new one")
        target = target if target is not None else MaskedLogitSum()
        self._activation, self._calls = None, 0
        grad_mode = torch.is_grad_enabled()
        # inference_mode(False): a caller under inference_mode (e.g. a web handler) still gets a graph.
        with torch.inference_mode(False):
            heatmaps, logits = self._forward_backward(images, target, grad_mode)
        if return_logits:
            return heatmaps, logits
        return heatmaps

    def _forward_backward(
        self, images: torch.Tensor, target: Target, grad_mode: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            torch.set_grad_enabled(False)
            self._active_thread = threading.get_ident()
            logits = self.model(images)
            self._active_thread = None
            activation = self._activation
            if activation is None:
                raise ExplainError("the Grad-CAM layer was not used by the model's forward pass")
            if not logits.requires_grad:
                raise ExplainError("the model output does not depend on the Grad-CAM layer")
            scores = target(logits)
            if scores.shape != (images.shape[0],):
                raise ExplainError(f"target must return one score per image, got shape {tuple(scores.shape)}")
            grads = None
            if self.method != "scorecam":
                (grads,) = torch.autograd.grad(scores.sum(), activation, allow_unused=True)
                if grads is None:
                    grads = torch.zeros_like(activation)
        finally:
            torch.set_grad_enabled(grad_mode)
            self._active_thread = None
            self._activation = None
        with torch.no_grad():
            if grads is None:
                cam = self._score_cam(images, activation.detach().float(), logits.detach(), target)
            else:
                cam = _cam_from(activation.detach().float(), grads.float(), self.method)
            cam = cam.clamp(min=0).unsqueeze(1)
            if cam.shape[-2:] != images.shape[-2:]:
                cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
            heatmaps = normalize_heatmaps(cam[:, 0])
        return heatmaps, logits.detach().float()

    def _score_cam(
        self, images: torch.Tensor, activation: torch.Tensor, logits: torch.Tensor, target: Target
    ) -> torch.Tensor:
        """Score-CAM (Wang et al. 2020): channel weights = softmax over channels of the target's
        score on the input masked by each channel's upsampled, min-max normalised activation.

        Upsampling with ``align_corners=True`` and the 1e-8 in the normalisation follow
        pytorch-grad-cam's ScoreCAM, so the two agree (tests/test_explain.py).
        """
        n, channels = activation.shape[:2]
        maps = F.interpolate(activation, size=images.shape[-2:], mode="bilinear", align_corners=True)
        flat = maps.reshape(n, channels, -1)
        low, high = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
        maps = (maps - low) / (high - low + 1e-8)
        scores = torch.empty(n, channels, device=activation.device)
        for i in range(n):
            fixed = _fixed_target(target, logits, i)
            for start in range(0, channels, self.score_batch_size):
                masks = maps[i, start : start + self.score_batch_size].unsqueeze(1)  # (c, 1, H, W)
                masked = images[i : i + 1] * masks.to(images.dtype)
                scores[i, start : start + len(masks)] = fixed(self.model(masked)).float()
        weights = torch.softmax(scores, dim=1)
        return (weights[:, :, None, None] * activation).sum(1)


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target: Target | None = None,
    layer: str | nn.Module = DEFAULT_LAYER,
    method: str = "gradcam",
) -> torch.Tensor:
    """One-shot :class:`SegmentationGradCAM` call: heatmaps ``(N, H, W)`` in [0, 1]."""
    with SegmentationGradCAM(model, layer, method) as cam:
        return cam(images, target)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The Grad-CAM driver: every caller's batch loop


def prepare_batch(
    images: Sequence[np.ndarray] | np.ndarray, image_size: int, device: torch.device | str, precision: str = "auto"
) -> torch.Tensor:
    """RGB ``uint8`` images of any size -> normalised ``(N, 3, S, S)`` on ``device`` (:func:`polypseg.inference.inferer.model_input`)."""
    return model_input(images, device, precision, image_size=image_size)


@dataclass
class CamBatch:
    """One batch's Grad-CAM: which images, the model input, heatmaps and logits, all at the model's size."""

    indices: slice  # positions of these images in the driver's input
    inputs: torch.Tensor  # normalised (n, 3, S, S)
    heatmaps: torch.Tensor  # float32 (n, S, S) in [0, 1]
    logits: torch.Tensor  # float32 (n, 1, S, S), detached

    @property
    def probabilities(self) -> torch.Tensor:
        """``sigmoid(logits)``, ``float32 (n, S, S)``."""
        return torch.sigmoid(self.logits[:, 0])


class GradCAMDriver:
    """The one Grad-CAM loop: model input, precision, hooks and batching for every caller.

    >>> with GradCAMDriver(model, image_size=256, device="cpu") as driver:
    ...     for cams in driver.batches(images, MaskedLogitSum(0.5)):
    ...         cams.heatmaps, cams.probabilities                    # (n, 256, 256)

    Images are RGB ``uint8`` (any sizes: each is resized to ``image_size``; ``None`` takes them
    as they are). ``precision`` follows :mod:`polypseg.core.precision`. The hooks of the underlying
    :class:`SegmentationGradCAM` are removed on exit or by :meth:`release`. ``model`` must be on
    ``device`` (default: where its parameters are) in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module = DEFAULT_LAYER,
        method: str = "gradcam",
        *,
        image_size: int | None = None,
        device: torch.device | str | None = None,
        precision: str = "auto",
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ExplainError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.image_size = image_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = precision
        self.batch_size = batch_size
        self._cam = SegmentationGradCAM(model, layer, method)

    def __enter__(self) -> GradCAMDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Remove the hooks; safe to call more than once."""
        self._cam.release()

    def run(self, images: ImageBatch, target: Target | None = None, indices: slice | None = None) -> CamBatch:
        """One batch: all of ``images`` in one forward and backward pass (``target`` defaults to :class:`MaskedLogitSum`)."""
        inputs = model_input(images, self.device, self.precision, image_size=self.image_size)
        with autocast(self.device, self.precision):
            heatmaps, logits = self._cam(inputs, target, return_logits=True)  # type: ignore[misc]
        return CamBatch(indices if indices is not None else slice(0, len(inputs)), inputs, heatmaps, logits)

    def batches(
        self, images: ImageBatch, target: Target | None = None, progress: str | None = None
    ) -> Iterator[CamBatch]:
        """:meth:`run` over ``images`` in batches of :attr:`batch_size` (``progress``: a bar so described).

        ``target`` applies to every batch: a :class:`RegionLogitSum` with one region per image
        belongs with :meth:`run`.
        """
        for indices in batch_slices(len(images), self.batch_size, progress):
            yield self.run(images[indices], target, indices)


def _resize_map(values: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    if tuple(values.shape[-2:]) != tuple(size):
        values = F.interpolate(values[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return values.clamp(0, 1).cpu().numpy().astype(np.float32)


def explain_images(
    model: nn.Module,
    images: Sequence[np.ndarray],
    image_size: int,
    threshold: float = 0.5,
    layer: str | nn.Module = DEFAULT_LAYER,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    method: str = "gradcam",
    precision: str = "auto",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Grad-CAM heatmaps and foreground probabilities for RGB ``uint8 (H, W, 3)`` images.

    Each image is resized to ``image_size`` for the model (the side it was trained at: a checkpoint's
    ``config.train.image_size``; a module does not carry it, so there is no default); both outputs come back as
    ``float32 (H, W)`` arrays at that image's original size. ``precision``: see :mod:`polypseg.core.precision`
    (bf16 heatmaps correlate >= 0.99 with fp32 ones; tests/test_precision.py). Heatmaps are in [0, 1] with maximum 1
    (all zero where the predicted mask at ``threshold`` is empty); probabilities are
    ``sigmoid(logits)`` from the same forward pass. ``model`` must already be on ``device`` and in
    eval mode.
    """
    heatmaps: list[np.ndarray] = []
    probabilities: list[np.ndarray] = []
    images = list(images)
    driver = GradCAMDriver(
        model, layer, method, image_size=image_size, device=device, precision=precision, batch_size=batch_size
    )
    with driver:
        for cams in driver.batches(images, MaskedLogitSum(threshold)):
            for image, heatmap, prob in zip(images[cams.indices], cams.heatmaps, cams.probabilities, strict=False):
                restored = to_original_size(heatmap, prob, image.shape[:2])
                heatmaps.append(restored[0])
                probabilities.append(restored[1])
    return heatmaps, probabilities


def resize_heatmap(heatmap: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of one model-size heatmap to ``(H, W)``, renormalised so its maximum stays 1."""
    resized = torch.from_numpy(_resize_map(heatmap.float(), (int(size[0]), int(size[1]))))
    return normalize_heatmaps(resized[None])[0].numpy()


def to_original_size(
    heatmap: torch.Tensor, probability: torch.Tensor, size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resize of one model-size heatmap and probability map to ``(H, W)``; the heatmap keeps maximum 1."""
    return resize_heatmap(heatmap, size), _resize_map(probability.float(), (int(size[0]), int(size[1])))
