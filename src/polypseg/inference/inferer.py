"""The inference core every caller shares (MONAI's "one inferer"): model input, batching, precision, TTA.

Evaluation (:func:`polypseg.training.evaluation.predict_probabilities`), :class:`polypseg.inference.predictor.Predictor`,
the Grad-CAM driver (:class:`polypseg.explain.gradcam.GradCAMDriver`), reports, the web service, video and
the benchmarks all go through these few functions:

* :func:`model_input`: RGB ``uint8`` images -> the normalised ``(N, 3, S, S)`` batch on the device,
  in the memory layout :mod:`polypseg.core.precision` asks for;
* :func:`batch_slices`: the one batching loop;
* :func:`model_logits` / :func:`probability_runner`: a forward pass under the one precision rule
  (:func:`polypseg.core.precision.autocast`);
* :func:`with_flip_tta`: the one test-time augmentation (mean over the image and its two flips).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from polypseg.core.precision import autocast, use_channels_last

Runner = Callable[[torch.Tensor], torch.Tensor]
ImageBatch = np.ndarray | torch.Tensor | Sequence[np.ndarray]


def batch_slices(n: int, batch_size: int, progress: str | None = None) -> Iterator[slice]:
    """``slice``s of at most ``batch_size`` over ``n`` items; with ``progress`` a transient bar so described."""
    starts: Sequence[int] | Iterator[int] = range(0, n, batch_size)
    if progress:
        from rich.progress import track

        starts = track(starts, description=progress, transient=True)
    for start in starts:
        yield slice(start, min(n, start + batch_size))


def _uint8_nchw(images: ImageBatch, image_size: int | None) -> torch.Tensor:
    """Images as a ``uint8 (N, 3, H, W)`` CPU tensor, resized to ``image_size`` where given and needed."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images[None]
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
            return _uint8_nchw(images.permute(0, 2, 3, 1).cpu().numpy(), image_size)
        return images
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    if image_size is not None:
        from polypseg.data.images import resize_image

        images = [img if img.shape[:2] == (image_size, image_size) else resize_image(img, image_size) for img in images]
    if not isinstance(images, np.ndarray):
        images = np.stack(images)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def model_input(
    images: ImageBatch,
    device: torch.device | str,
    precision: str | None = "auto",
    image_size: int | None = None,
    pin_memory: bool = False,
) -> torch.Tensor:
    """RGB ``uint8`` images -> ImageNet-normalised ``float32 (N, 3, S, S)`` on ``device``.

    ``images``: a numpy array ``(N, H, W, 3)`` or ``(H, W, 3)``, a list of such arrays, or a
    ``uint8`` tensor ``(N, H, W, 3)`` / ``(N, 3, H, W)``. With ``image_size`` each image is
    resized to it first (:func:`polypseg.data.images.resize_image`). Normalisation runs on ``device``.
    The batch is channels-last where :func:`polypseg.core.precision.use_channels_last` says so for
    ``precision``; ``precision=None`` leaves it NCHW (for runners that choose the layout themselves).
    """
    from polypseg.data.transforms import normalize

    device = torch.device(device)
    tensor = _uint8_nchw(images, image_size)
    if pin_memory and device.type == "cuda":
        tensor = tensor.pin_memory()
    batch = normalize(tensor.to(device, non_blocking=True))
    if precision is not None and use_channels_last(device, precision):
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def use_precision_layout(model: nn.Module, device: torch.device | str, precision: str = "auto") -> bool:
    """Make ``model`` channels-last (in place) where the precision rule wants it; True if so.

    Only for models the caller owns for inference: a training model keeps the layout its step chose.
    """
    channels_last = use_channels_last(device, precision)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return channels_last


def model_logits(model: nn.Module, batch: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """``model(batch)`` under the precision rule's autocast, as ``float32``."""
    with autocast(batch.device, precision):
        return model(batch).float()


def probability_runner(
    model: nn.Module, device: torch.device | str, precision: str = "auto", channels_last: bool = False
) -> Runner:
    """Normalised ``(N, 3, S, S)`` -> sigmoid probabilities ``float32 (N, 1, S, S)`` under the precision rule.

    With ``channels_last`` each batch is made channels-last first (the model's layout is the caller's).
    """
    device = torch.device(device)

    def run(batch: torch.Tensor) -> torch.Tensor:
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(batch)
        return torch.sigmoid(logits.float())

    return run


def with_flip_tta(run: Runner) -> Runner:
    """Mean of the image's and its horizontal and vertical flips' probabilities."""

    def tta(batch: torch.Tensor) -> torch.Tensor:
        return (run(batch) + run(batch.flip(3)).flip(3) + run(batch.flip(2)).flip(2)) / 3

    return tta
