"""Inference on images of any size: one checkpoint, a cross-validation ensemble, or an ONNX model.

``Predictor.from_checkpoint(path)`` accepts a checkpoint (``NAME.safetensors`` + ``NAME.json``),
a CV run folder (the mean probability of its fold models, with the per-pixel standard deviation
across folds as an uncertainty map) or an exported ``.onnx`` file. Images are resized to the
training size, and the probability map is resized back (bilinear) before thresholding, so masks
always have the input's size.

Backends: ``torch`` (bf16 autocast and channels-last on CUDA and on CPUs with native bf16, see
:mod:`polypseg.core.precision`; optionally ``torch.compile``), ``onnxruntime``, and ``openvino`` (CPU,
bf16 where the CPU has it; the optional ``polypseg[openvino]`` extra). ``backend="auto"`` picks torch on CUDA and, on
CPU, OpenVINO where it is installed, else onnxruntime: the fastest engines whose Dice change against
fp32 stayed within 0.005 on the shipped model (docs/benchmarks.md); each checkpoint is exported to ONNX on first use into
the cache folder (``~/.cache/polypseg/onnx``), keyed by its content hash. A validated int8 model (``NAME.int8.onnx``, from
``polypseg export --int8 --validate``) is preferred on CPU when its measured Dice change is within
:data:`polypseg.inference.export.MAX_INT8_DICE_CHANGE`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polypseg.core.devices import DeviceError, resolve_device
from polypseg.core.io_utils import display_name
from polypseg.core.rules import threshold_problem
from polypseg.data.images import ImageReadError
from polypseg.data.inputs import ImageInput, load_input, to_rgb_uint8  # noqa: F401 - to_rgb_uint8 stays importable from here
from polypseg.data.inputs import is_pil as _is_pil
from polypseg.data.transforms import resize_probabilities
from polypseg.inference.inferer import (
    Runner,
    batch_slices,
    model_input,
    with_flip_tta,
)
from polypseg.inference.loading import (  # noqa: F401 - BACKENDS and PredictorError stay importable from here
    BACKENDS,
    EngineRequest,
    ModelSource,
    PredictorError,
    check_backend,
    choose_engine,
    onnx_model_paths,
    read_onnx_sidecars,
    resolve_source,
)
from polypseg.inference.masks import (  # noqa: F401 - these stay importable from here
    overlay_mask,
    overlay_mask_inplace,
    upsample_mask,
    upsample_rows,
    upsample_uint8,
)
from polypseg.inference.openvino_engine import OpenVINOError, StaticShapeModel, openvino_config, require_openvino
from polypseg.inference.runners import onnx_runner, openvino_runner, torch_runner
from polypseg.models.checkpoint import CheckpointError

log = logging.getLogger(__name__)

COMPILE_MODES = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default")


@dataclass
class Prediction:
    """One image's result, at the input image's size.

    ``mean_confidence`` is the mean probability over the pixels of the mask (how sure the model
    is about the polyp it reports); it is 0.0 when the mask is empty.
    """

    probability: np.ndarray  # float32 (H, W) in [0, 1]
    threshold: float
    uncertainty: np.ndarray | None = None  # float32 (H, W): std of the fold probabilities
    source: str = ""
    mask: np.ndarray = field(init=False, repr=False)  # bool (H, W): probability >= threshold

    def __post_init__(self) -> None:
        self.mask = self.probability >= self.threshold

    @property
    def area_pixels(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def area_fraction(self) -> float:
        return self.area_pixels / max(self.mask.size, 1)

    @property
    def mean_confidence(self) -> float:
        if not self.mask.any():
            return 0.0
        return float(self.probability[self.mask].mean())

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.probability.shape[0], self.probability.shape[1]

    def with_threshold(self, threshold: float) -> Prediction:
        """The same probabilities thresholded again (the model is not rerun)."""
        return dataclasses.replace(self, threshold=float(threshold))


# --------------------------------------------------------------------------------------------
# Predictor


class Predictor:
    """Batched inference with one model or an ensemble; see :meth:`from_checkpoint`."""

    def __init__(
        self,
        runners: Sequence[Runner],
        *,
        image_size: int,
        threshold: float = 0.5,
        device: str | torch.device = "cpu",
        backend: str = "torch",
        models: Sequence[nn.Module] = (),
        metadata: dict[str, Any] | None = None,
        tta: bool = False,
        batch_size: int = 8,
        compile_mode: str | None = None,
        precision: str = "fp32",
    ) -> None:
        if not runners:
            raise PredictorError("a predictor needs at least one model")
        if batch_size < 1:
            raise PredictorError(f"batch_size must be >= 1, got {batch_size}")
        self._runners = list(runners)
        self.image_size = int(image_size)
        problem = threshold_problem(threshold)
        if problem is not None:
            raise PredictorError(f"threshold {problem}")
        self.threshold = float(threshold)
        self.device = torch.device(device)
        self.backend = backend
        self.models = list(models)
        self.metadata = metadata or {}
        self.tta = tta
        self.batch_size = int(batch_size)
        self.compile_mode = compile_mode
        self.precision = precision  # what the runners compute in: fp32, bf16 or int8

    def __repr__(self) -> str:
        return (
            f"Predictor(backend={self.backend!r}, precision={self.precision!r}, models={len(self._runners)}, device={str(self.device)!r}, "
            f"image_size={self.image_size}, threshold={self.threshold:g}, tta={self.tta})"
        )

    @property
    def n_models(self) -> int:
        return len(self._runners)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_model(
        cls,
        model: nn.Module | Sequence[nn.Module],
        *,
        image_size: int,
        threshold: float = 0.5,
        device: str | torch.device = "auto",
        tta: bool = False,
        batch_size: int = 8,
        compile: bool | str = False,
        metadata: dict[str, Any] | None = None,
        precision: str = "auto",
    ) -> Predictor:
        """A torch predictor over in-memory model(s) returning logits (several = ensemble).

        ``image_size`` is the side the models were trained at (a checkpoint's
        ``config.train.image_size``; a module does not carry it, so there is no default).

        ``precision`` follows :mod:`polypseg.core.precision` (``auto``: bf16 on CUDA and on CPUs with native bf16).
        """
        from polypseg.core.precision import resolve_precision

        device = _resolve_device(device)
        precision = resolve_precision(precision, device)
        models = [model] if isinstance(model, nn.Module) else list(model)
        compile_mode = _compile_mode(compile)
        runners = []
        for m in models:
            m.eval().to(device)
            run = torch_runner(m, device, compile_mode, precision)
            runners.append(with_flip_tta(run) if tta else run)
        return cls(
            runners,
            image_size=image_size,
            threshold=threshold,
            device=device,
            backend="torch",
            models=models,
            metadata=metadata,
            tta=tta,
            batch_size=batch_size,
            compile_mode=compile_mode,
            precision=precision,
        )

    @classmethod
    def from_onnx(
        cls,
        paths: Path | str | Sequence[Path | str],
        *,
        device: str | torch.device = "cpu",
        threshold: float | None = None,
        tta: bool = False,
        batch_size: int = 8,
        metadata: dict[str, Any] | None = None,
    ) -> Predictor:
        """An onnxruntime predictor over exported model(s); sizes and threshold come from their sidecars."""
        from polypseg.inference.export import create_session

        device = _resolve_device(device)
        paths = onnx_model_paths(paths)
        runners = []
        for path in paths:
            run = onnx_runner(create_session(path, device=str(device)))
            runners.append(with_flip_tta(run) if tta else run)
        image_size, meta, threshold = read_onnx_sidecars(paths, threshold, metadata)
        return cls(
            runners,
            image_size=image_size,
            threshold=threshold,
            device=device,
            backend="onnxruntime",
            metadata=meta,
            tta=tta,
            batch_size=batch_size,
            precision="int8" if "quantization" in meta else "fp32",
        )

    @classmethod
    def from_openvino(
        cls,
        paths: Path | str | Sequence[Path | str],
        *,
        precision: str = "auto",
        threshold: float | None = None,
        tta: bool = False,
        batch_size: int = 8,
        metadata: dict[str, Any] | None = None,
    ) -> Predictor:
        """An OpenVINO (CPU) predictor over exported ONNX model(s), the optional ``polypseg[openvino]`` extra.

        ``precision``: ``auto`` runs bf16 where the CPU computes it natively (``amx_bf16`` or
        ``avx512_bf16``), else fp32; ``fp32`` and ``bf16`` force it. A quantized (QDQ int8) model
        runs in int8 whatever is asked.
        """
        from polypseg.core.precision import check_precision, resolve_precision

        check_precision(precision)
        try:
            require_openvino("the openvino backend")
        except OpenVINOError as error:
            raise PredictorError(str(error)) from None
        paths = onnx_model_paths(paths)
        resolved = resolve_precision(precision, "cpu")
        runners = []
        for path in paths:
            try:
                model = StaticShapeModel(path, openvino_config(resolved))
            except OpenVINOError as error:
                raise PredictorError(str(error)) from None
            run = openvino_runner(model)
            runners.append(with_flip_tta(run) if tta else run)
        image_size, meta, threshold = read_onnx_sidecars(paths, threshold, metadata)
        return cls(
            runners,
            image_size=image_size,
            threshold=threshold,
            device="cpu",
            backend="openvino",
            metadata=meta,
            tta=tta,
            batch_size=batch_size,
            precision="int8" if "quantization" in meta else resolved,
        )

    @classmethod
    def from_checkpoint(
        cls,
        path_or_run: Path | str | None = None,
        *,
        device: str | torch.device = "auto",
        backend: str = "auto",
        tta: bool = False,
        threshold: float | None = None,
        fold: int | None = None,
        batch_size: int = 8,
        compile: bool | str = False,
        cache_dir: Path | str | None = None,
        notify: Callable[[str], None] | None = None,
        precision: str = "auto",
    ) -> Predictor:
        """Load a checkpoint, a CV run folder (ensemble of its folds; ``fold=K`` for one) or an ``.onnx`` file.

        ``None`` (or a shipped model's name) loads a model shipped with polypseg, its file checked
        against the SHA-256 in the package's registry (:mod:`polypseg.models.pretrained`).

        The threshold defaults to the run's ``summary.json`` threshold, else the checkpoints' own,
        else 0.5. ``backend="auto"``: torch on CUDA; on CPU OpenVINO if installed (``precision``:
        bf16 where the CPU has it), else onnxruntime, each on the validated int8 model where there
        is one (each checkpoint exported on first use into the cache, ``cache_dir/onnx`` or
        ``~/.cache/polypseg/onnx``, keyed by the checkpoint's content hash; never into the run
        folder; torch if the export fails). The choice is :func:`polypseg.inference.loading.choose_engine`,
        the model found by :func:`polypseg.inference.loading.resolve_source`, the engines in :data:`ENGINES`.
        ``notify`` receives one-line notes (an export starting, a fallback to torch); by default
        they are logged.
        """
        check_backend(backend)
        device = _resolve_device(device)
        source = resolve_source(path_or_run, fold=fold, threshold=threshold)
        request = EngineRequest(
            backend=backend,
            device=str(device),
            compile=_compile_mode(compile) is not None,
            openvino_installed=openvino_installed(),
            precision=precision,
            onnx_model=source.is_onnx,
            fold=fold is not None,
            model=str(source.path),
        )
        choice = choose_engine(request)
        say = notify or log.warning
        engine = ENGINES[choice.engine]
        if engine.runs_onnx and not source.is_onnx:
            try:
                exported = _onnx_models(
                    source.checkpoints, cache_dir, say, prefer_int8=choice.prefer_int8, engine=engine.label
                )
                source = source.with_onnx(exported)
            except CheckpointError:
                raise  # a broken checkpoint is not an onnxruntime problem: torch could not load it either
            except Exception as error:  # any export failure: fall back where the choice allows, say why
                if choice.fallback is None:
                    raise
                say(
                    f"{engine.label} unavailable for {display_name(source.path)} ({str(error).splitlines()[0]}); using torch"
                )
                engine = ENGINES[choice.fallback]
        options = LoadOptions(device=device, precision=precision, tta=tta, batch_size=batch_size, compile=compile)
        return engine.load(source, options)

    # ---------------------------------------------------------------- prediction

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean probability over models and, for an ensemble, their per-pixel std (population)."""
        with torch.inference_mode():
            batch = batch.to(self.device, non_blocking=True)
            if len(self._runners) == 1:
                return self._runners[0](batch), None
            stacked = torch.stack([run(batch) for run in self._runners])
            return stacked.mean(0), stacked.std(0, correction=0)

    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised ``(N, 3, S, S)`` -> probabilities ``float32 (N, 1, S, S)`` on the predictor's device."""
        return self._forward(batch)[0]

    def _upload(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """RGB ``uint8`` images of any sizes -> the normalised batch at :attr:`image_size` on the device."""
        # NCHW: each runner picks its own layout (ONNX and OpenVINO take the array as it is)
        return model_input(images, self.device, precision=None, image_size=self.image_size, pin_memory=True)

    def predict_resized(self, images: np.ndarray) -> np.ndarray:
        """``uint8 (N, S, S, 3)`` already at :attr:`image_size` -> probabilities ``float32 (N, S, S)`` (numpy)."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3) or images.dtype != np.uint8:
            raise PredictorError(
                f"predict_resized expects uint8 (N, {self.image_size}, {self.image_size}, 3), got {images.dtype} {images.shape}"
            )
        out = np.empty(images.shape[:3], dtype=np.float32)
        for batch in batch_slices(len(images), self.batch_size):
            out[batch] = self.predict_tensor(self._upload(images[batch]))[:, 0].float().cpu().numpy()
        return out

    def predict(
        self,
        inputs: ImageInput | Iterable[ImageInput],
        on_error: Callable[[str, Exception], None] | None = None,
    ) -> list[Prediction]:
        """Predict arrays, PIL images or paths of any size; results come back at each input's size.

        An input that cannot be read raises :class:`polypseg.data.images.ImageReadError` naming it, or,
        with ``on_error``, is reported as ``on_error(name, error)`` and left out of the result.
        """
        if isinstance(inputs, (np.ndarray, str, Path)) or _is_pil(inputs):
            inputs = [inputs]  # type: ignore[list-item]
        results: list[Prediction] = []
        pending: list[tuple[np.ndarray, str]] = []
        for index, item in enumerate(inputs):  # type: ignore[arg-type]
            try:
                pending.append(load_input(item, index))
            except ImageReadError as error:
                if on_error is None:
                    raise
                on_error(str(item) if isinstance(item, (str, Path)) else f"input {index}", error)
                continue
            if len(pending) == self.batch_size:
                results += self._predict_images(pending)
                pending = []
        if pending:
            results += self._predict_images(pending)
        return results

    def predict_one(self, image: ImageInput) -> Prediction:
        """One input -> one :class:`Prediction` (raises if it cannot be read)."""
        return self.predict([image])[0]

    def predict_model_size(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB ``uint8`` images of any sizes -> probabilities ``float32 (N, S, S)`` at the model's
        size and, for an ensemble, the per-pixel std across models (else None).

        The memory-light path for large images: nothing is held at full size; bring the maps to an
        image's size piece by piece with :func:`upsample_rows`.
        """
        means, stds = [], []
        for batch in batch_slices(len(images), self.batch_size):
            mean, std = self._forward(self._upload(images[batch]))
            means.append(mean[:, 0].float().cpu().numpy())
            if std is not None:
                stds.append(std[:, 0].float().cpu().numpy())
        return np.concatenate(means), (np.concatenate(stds) if stds else None)

    def _predict_images(self, items: list[tuple[np.ndarray, str]]) -> list[Prediction]:
        mean, std = self._forward(self._upload([image for image, _ in items]))
        results = []
        for i, (image, name) in enumerate(items):
            shape = image.shape[:2]
            probability = resize_probabilities(mean[i : i + 1].float(), shape)[0, 0].cpu().numpy()
            uncertainty = None
            if std is not None:
                uncertainty = resize_probabilities(std[i : i + 1].float(), shape)[0, 0].cpu().numpy()
            results.append(Prediction(probability.astype(np.float32, copy=False), self.threshold, uncertainty, name))
        return results


# --------------------------------------------------------------------------------------------
# Engines: name -> how it loads a model source (the registry from_checkpoint picks from)


@dataclass(frozen=True)
class LoadOptions:
    """The options of :meth:`Predictor.from_checkpoint` an engine loads a model with."""

    device: torch.device
    precision: str = "auto"
    tta: bool = False
    batch_size: int = 8
    compile: bool | str = False


@dataclass(frozen=True)
class Engine:
    """One inference engine: ``load`` builds a :class:`Predictor` from a :class:`ModelSource`.

    ``runs_onnx``: it runs exported ONNX models, so checkpoints are exported (and cached) first.
    ``label``: how notes name it.
    """

    label: str
    runs_onnx: bool
    load: Callable[[ModelSource, LoadOptions], Predictor]


def _load_torch(source: ModelSource, options: LoadOptions) -> Predictor:
    from polypseg.models.checkpoint import load_checkpoint

    assert source.image_size is not None and source.threshold is not None  # resolve_source sets both for checkpoints
    models = [load_checkpoint(c, device="cpu").model for c in source.checkpoints]
    return Predictor.from_model(
        models,
        image_size=source.image_size,
        threshold=source.threshold,
        device=options.device,
        tta=options.tta,
        batch_size=options.batch_size,
        compile=options.compile,
        metadata=source.metadata,
        precision=options.precision,
    )


def _load_onnxruntime(source: ModelSource, options: LoadOptions) -> Predictor:
    return Predictor.from_onnx(
        list(source.onnx),
        device=options.device,
        threshold=source.threshold,
        tta=options.tta,
        batch_size=options.batch_size,
        metadata=source.metadata,
    )


def _load_openvino(source: ModelSource, options: LoadOptions) -> Predictor:
    return Predictor.from_openvino(
        list(source.onnx),
        precision=options.precision,
        threshold=source.threshold,
        tta=options.tta,
        batch_size=options.batch_size,
        metadata=source.metadata,
    )


ENGINES: dict[str, Engine] = {
    "torch": Engine("torch", runs_onnx=False, load=_load_torch),
    "onnxruntime": Engine("onnxruntime", runs_onnx=True, load=_load_onnxruntime),
    "openvino": Engine("OpenVINO", runs_onnx=True, load=_load_openvino),
}


# --------------------------------------------------------------------------------------------
# Helpers


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        return resolve_device(device)
    except DeviceError as error:  # the Predictor API reports all its option errors as PredictorError
        raise PredictorError(str(error)) from None


def _compile_mode(compile: bool | str | None) -> str | None:
    if compile in (False, None, "", "none", "eager"):
        return None
    if compile is True:
        return "max-autotune"
    if compile not in COMPILE_MODES:
        raise PredictorError(f"compile mode '{compile}': choose one of none, {', '.join(COMPILE_MODES)}")
    return str(compile)


def openvino_installed() -> bool:
    """Whether the optional OpenVINO engine (``polypseg[openvino]``) imports. A package that is present
    but cannot load (a missing shared library, a build for another Python) counts as not installed,
    so ``auto`` takes onnxruntime at once instead of failing after a whole ONNX export."""
    try:
        import openvino  # noqa: F401
    except Exception:  # noqa: BLE001 - whatever stops the import, the engine cannot run here
        return False
    return True


def _preferred_onnx(
    checkpoint: Path, cache_dir: Path | str | None = None, notify: Callable[[str], None] | None = None
) -> Path:
    """For ``backend="auto"`` on CPU: a validated int8 model if one exists (beside the checkpoint or
    in the cache), else the cached fp32 export."""
    from polypseg.inference.export import cached_onnx, find_validated_int8

    return find_validated_int8(checkpoint, cache_dir) or cached_onnx(checkpoint, cache_dir, notify)


def _onnx_models(
    checkpoints: Sequence[Path],
    cache_dir: Path | str | None,
    say: Callable[[str], None],
    *,
    prefer_int8: bool,
    engine: str,
) -> list[Path]:
    """The ONNX model of each checkpoint; one note before exporting the ones not cached yet."""
    from polypseg.inference.export import cached_onnx, find_cached_onnx, onnx_cache_dir
    from polypseg.models.checkpoint import verify_weights

    missing = [c for c in checkpoints if find_cached_onnx(c, cache_dir) is None]
    for checkpoint in missing:
        verify_weights(checkpoint)  # a corrupt checkpoint is refused before an export is announced
    if missing:
        what = "1 model" if len(missing) == 1 else f"{len(missing)} models"
        say(
            f"exporting {what} to ONNX for {engine} (once: kept in {display_name(onnx_cache_dir(cache_dir))}, keyed by the checkpoint's content)"
        )
    quiet: Callable[[str], None] = lambda message: None  # noqa: E731 - said once above
    if prefer_int8:
        return [_preferred_onnx(c, cache_dir, quiet) for c in checkpoints]
    return [cached_onnx(c, cache_dir, quiet) for c in checkpoints]
