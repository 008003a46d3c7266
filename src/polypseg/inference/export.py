"""ONNX export, onnxruntime sessions and int8 quantization.

The exported graph includes the sigmoid. Input ``image``: ImageNet-normalised float32
``(N, 3, S, S)`` (dynamic batch, ``S`` = the training size); output ``probability``: float32
``(N, 1, S, S)``. Every ``X.onnx`` has a JSON sidecar ``X.onnx.json`` (config, threshold, image
size, source checkpoint) so that :class:`polypseg.inference.predictor.Predictor` can load the ``.onnx`` alone.

int8: static quantization in QDQ format (per-channel int8 weights, uint8 activations, min-max
calibration on real images). On a 2-core CPU it is about 3x faster than fp32 onnxruntime; dynamic
quantization is slower than fp32 for this convolutional model (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polypseg._version import __version__
from polypseg.core.io_utils import atomic_write, atomic_write_json, read_json, remove_stale_temps
from polypseg.errors import PolypsegError

ONNX_FORMAT = "polypseg-onnx-v1"
DEFAULT_OPSET = 18  # the torch.export-based exporter's native opset; onnxruntime >= 1.14 runs it
# A quantized model replaces fp32 by default on CPU only if its measured Dice change is this small.
MAX_INT8_DICE_CHANGE = 0.005

log = logging.getLogger(__name__)


class ExportError(PolypsegError):
    """A model cannot be exported, quantized or loaded with onnxruntime."""


class _Probability(nn.Module):
    """Logits model + sigmoid, so the exported output is the probability map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


# --------------------------------------------------------------------------------------------
# Paths and sidecars


def onnx_sidecar(onnx_path: Path | str) -> Path:
    """``X.onnx`` -> ``X.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def int8_path_for(checkpoint: Path | str) -> Path:
    """Where ``polypseg export --int8`` puts a checkpoint's quantized model: ``NAME.int8.onnx``."""
    from polypseg.models.checkpoint import checkpoint_paths

    weights, _ = checkpoint_paths(checkpoint)
    return weights.with_suffix(".int8.onnx")


def _fingerprint(checkpoint: Path) -> dict[str, Any]:
    """What an export was made from: the checkpoint's name and the SHA-256 of its content
    (:func:`polypseg.models.checkpoint.checkpoint_content_key`), never its size or modification time."""
    from polypseg.models.checkpoint import checkpoint_content_key, checkpoint_paths

    weights, _ = checkpoint_paths(checkpoint)
    return {"weights": weights.name, "sha256": checkpoint_content_key(weights)}


def read_onnx_metadata(onnx_path: Path | str) -> dict[str, Any]:
    """The sidecar of an exported model; without one, the input size is read from the graph."""
    onnx_path = Path(onnx_path)
    sidecar = onnx_sidecar(onnx_path)
    if sidecar.is_file():
        try:
            meta = read_json(sidecar)
        except ValueError as error:
            raise ExportError(f"{sidecar} is not valid JSON: {error}") from None
        if meta.get("format") != ONNX_FORMAT:
            raise ExportError(f"{sidecar} is not a polypseg ONNX sidecar (format {meta.get('format')!r})")
        return meta
    import onnx

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad file
        raise ExportError(f"cannot read ONNX model {onnx_path}: {str(error).splitlines()[0]}") from None
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[2].dim_value:
        raise ExportError(
            f"{onnx_path} has no {sidecar.name} and no fixed input size; re-export it with polypseg export"
        )
    return {"format": ONNX_FORMAT, "image_size": int(dims[2].dim_value), "threshold": 0.5, "output": "probability"}


# --------------------------------------------------------------------------------------------
# Export


def export_onnx(
    checkpoint_path: Path | str,
    out_path: Path | str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    *,
    threshold: float | None = None,
) -> Path:
    """Export a checkpoint to ONNX (sigmoid included) with its sidecar; returns the ``.onnx`` path.

    ``out_path`` defaults to ``NAME.onnx`` next to the checkpoint. Both files are written atomically.
    The sidecar's threshold is ``threshold``, else the checkpoint's own; ``polypseg export``
    (:func:`polypseg.inference.deploy.export_checkpoints`) passes the one predict would use
    (:func:`polypseg.inference.loading.resolve_source`: a CV fold's is its run's ``summary.json`` threshold).
    """
    from polypseg.models.checkpoint import checkpoint_paths, load_checkpoint

    checkpoint_path = Path(checkpoint_path)
    weights, _ = checkpoint_paths(checkpoint_path)
    out = Path(out_path) if out_path is not None else weights.with_suffix(".onnx")
    if out.suffix != ".onnx":
        raise ExportError(f"--out {out}: the file name must end in .onnx")
    checkpoint = load_checkpoint(checkpoint_path, device="cpu")
    size = int(checkpoint.config.train.image_size)
    model = _Probability(checkpoint.model).eval()
    atomic_write(out, lambda tmp: _export_graph(model, size, tmp, opset, dynamic_batch))
    written = written_opset(out)
    if written != opset:  # the exporter converts from its native opset and may quietly keep that one
        out.unlink()
        raise ExportError(f"--opset {opset}: the exporter could only write opset {written}; choose another")
    atomic_write_json(
        onnx_sidecar(out),
        {
            "format": ONNX_FORMAT,
            "polypseg_version": __version__,
            "torch_version": torch.__version__,
            "opset": opset,
            "input": {
                "name": "image",
                "shape": ["batch" if dynamic_batch else 1, 3, size, size],
                "normalization": "imagenet",
            },
            "output": "probability",
            "image_size": size,
            "threshold": checkpoint.threshold if threshold is None else threshold,
            "config": checkpoint.config.to_dict(),
            "metrics": checkpoint.metadata.get("metrics", {}),
            "source": _fingerprint(checkpoint_path),
        },
    )
    return out


def written_opset(path: Path) -> int:
    """The default-domain opset an ``.onnx`` file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _export_graph(
    model: nn.Module,
    size: int,
    path: Path,
    opset: int,
    dynamic_batch: bool,
    dynamo: bool = True,
    output_names: tuple[str, ...] = ("probability",),
    device: torch.device | str = "cpu",
) -> None:
    """``torch.onnx.export`` with the torch.export-based exporter; the TorchScript one if that fails."""
    example = torch.randn(2 if dynamic_batch else 1, 3, size, size, device=device)
    kwargs: dict[str, Any] = dict(input_names=["image"], output_names=list(output_names), opset_version=opset)
    # Below its native opset the exporter logs that it converts and how; written_opset() checks the
    # result and says so in one line, so those multi-line warnings would only be noise.
    with warnings.catch_warnings(), _quiet_stdout(), _quiet_logging("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")
        if dynamo:
            try:
                shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=True,
                    dynamic_shapes=shapes,
                    external_data=False,
                    verbose=False,
                    **kwargs,
                )
                return
            except Exception as error:  # noqa: BLE001 - retry with the older exporter, keep the reason
                log.warning(
                    "torch.export-based ONNX export failed (%s); using the TorchScript exporter",
                    str(error).splitlines()[0],
                )
        axes = {name: {0: "batch"} for name in ("image", *output_names)} if dynamic_batch else None
        # The TorchScript exporter restores the module's training flag afterwards: keep it in eval.
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, dynamic_axes=axes, do_constant_folding=True, **kwargs
        )
    model.eval()


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def onnx_cache_dir(cache_dir: Path | str | None = None) -> Path:
    """Where exports made for prediction live: ``CACHE/onnx`` (see :func:`polypseg.data.cache.default_cache_dir`)."""
    from polypseg.data.cache import default_cache_dir

    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "onnx"


def _cache_entry(source: dict[str, Any], cache_dir: Path | str | None) -> Path:
    # the exporter's settings are part of what an export is made from
    key = hashlib.sha256(f"{ONNX_FORMAT}|{DEFAULT_OPSET}|{source['sha256']}".encode()).hexdigest()[:32]
    return onnx_cache_dir(cache_dir) / f"{key}.onnx"


def _matches(path: Path, source: dict[str, Any]) -> bool:
    """An export of exactly this content, with a batch axis (prediction sends batches of any size)."""
    if not (path.is_file() and onnx_sidecar(path).is_file()):
        return False
    try:
        meta = read_onnx_metadata(path)
        dynamic = meta.get("input", {}).get("shape", ["batch"])[0] == "batch"
        return dynamic and meta.get("source", {}).get("sha256") == source["sha256"]
    except (ExportError, AttributeError, IndexError, TypeError):
        return False


def find_cached_onnx(
    checkpoint: Path | str, cache_dir: Path | str | None = None, source: dict[str, Any] | None = None
) -> Path | None:
    """An existing export of exactly this checkpoint's content, or None.

    Looks in the cache and at ``NAME.onnx`` beside the checkpoint (written by ``polypseg
    export``); either counts only if its sidecar names the checkpoint's current content hash.
    """
    from polypseg.models.checkpoint import checkpoint_paths

    weights, _ = checkpoint_paths(checkpoint)
    source = source or _fingerprint(weights)
    for path in (_cache_entry(source, cache_dir), weights.with_suffix(".onnx")):
        if _matches(path, source):
            return path
    return None


def cached_onnx(
    checkpoint: Path | str,
    cache_dir: Path | str | None = None,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """An ONNX export of ``checkpoint`` for prediction, made on first use and kept in the cache.

    The cache entry is named by the SHA-256 of the checkpoint's content, so a checkpoint whose
    weights or metadata change (whatever its size and modification time) is exported again, and a
    corrupt one fails to load instead of answering from an old export. Nothing is written beside
    the checkpoint. ``notify`` receives one line before an export starts.
    """
    from polypseg.models.checkpoint import checkpoint_paths

    weights, _ = checkpoint_paths(checkpoint)
    source = _fingerprint(weights)
    found = find_cached_onnx(weights, cache_dir, source)
    if found is not None:
        return found
    target = _cache_entry(source, cache_dir)
    remove_stale_temps(target.parent)  # exports cut short by a kill
    (notify or log.info)(f"exporting {weights} to ONNX (once; cached in {target.parent})")
    try:
        return export_onnx(weights, target)
    except OSError as error:
        raise ExportError(
            f"cannot write an ONNX export of {weights} to {target.parent}: {error.strerror or error}; pass --cache-dir"
        ) from None


# --------------------------------------------------------------------------------------------
# onnxruntime


def create_session(onnx_path: Path | str, device: str = "cpu", threads: int | None = None) -> Any:
    """An onnxruntime session with all graph optimisations; CUDA provider when ``device`` is CUDA."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers: list[Any] = ["CPUExecutionProvider"]
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError("onnxruntime has no CUDA provider here: pip install onnxruntime-gpu, or use --device cpu")
        index = torch.device(device).index
        providers.insert(
            0, ("CUDAExecutionProvider", {"device_id": index}) if index is not None else "CUDAExecutionProvider"
        )
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot load {onnx_path}: {str(error).splitlines()[0]}") from None


def verify_onnx(
    checkpoint: Path | str,
    onnx_path: Path | str,
    images: Sequence[Any] | None = None,
    random_images: int = 2,
    seed: int = 0,
) -> float:
    """Largest absolute probability difference between PyTorch (fp32, CPU) and onnxruntime.

    Compared on ``random_images`` uniform-noise images and on ``images`` (paths or arrays, any
    size; resized as in prediction), all in one batch so the dynamic batch axis is exercised.
    """
    from polypseg.data.inputs import load_input
    from polypseg.data.transforms import preprocess
    from polypseg.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, device="cpu")
    size = int(ckpt.config.train.image_size)
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(random_images)]
    arrays += [load_input(item, i)[0] for i, item in enumerate(images or [])]
    if not arrays:
        raise ExportError("verify_onnx needs at least one image")
    batch = preprocess(arrays, size)
    with torch.inference_mode():
        expected = torch.sigmoid(ckpt.model(batch)).numpy()
    session = create_session(onnx_path)
    name, batch_dim = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    if isinstance(batch_dim, int):  # a fixed batch (--static-batch): one image per run
        actual = np.concatenate([session.run(None, {name: row[None]})[0] for row in batch.numpy()])
    else:
        actual = session.run(None, {name: batch.numpy()})[0]
    if actual.shape != expected.shape:
        raise ExportError(f"{onnx_path}: output shape {actual.shape} differs from PyTorch's {expected.shape}")
    return float(np.abs(actual - expected).max())


# --------------------------------------------------------------------------------------------
# int8


def collect_images(source: Path | str | Sequence[Any]) -> list[Any]:
    """Calibration/verification images: a folder of images, a dataset root (its ``images/``), or a list."""
    from polypseg.data.images import DataError
    from polypseg.data.pairing import IMAGE_EXTENSIONS, find_layout

    if not isinstance(source, (str, Path)):
        return list(source)
    folder = Path(source)
    if not folder.is_dir():
        raise ExportError(f"image folder not found: {folder}")

    def images_in(directory: Path) -> list[Path]:
        return sorted(
            p
            for p in directory.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )

    found = images_in(folder)
    if not found:
        try:
            found = images_in(find_layout(folder)[0])
        except DataError:
            if (folder / "images").is_dir():
                found = images_in(folder / "images")
    if not found:
        raise ExportError(f"no images in {folder}")
    return found


class _CalibrationReader:
    """Feeds preprocessed images to onnxruntime's calibrator, a few at a time; skips unreadable files,
    naming each to ``warn`` once (also after a :meth:`rewind`)."""

    def __init__(
        self,
        images: Sequence[Any],
        size: int,
        input_name: str,
        batch_size: int = 8,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self._images = list(images)
        self._size = size
        self._name = input_name
        self._batch_size = batch_size
        self._warn = warn or log.warning
        self._position = 0
        self.used = 0
        self.files: list[str] = []  # the names of the image files calibrated on (arrays have none)
        self.unreadable: list[str] = []  # the inputs that could not be read, by name

    def get_next(self) -> dict[str, np.ndarray] | None:
        from polypseg.data.images import ImageReadError
        from polypseg.data.inputs import load_input
        from polypseg.data.transforms import preprocess

        while self._position < len(self._images):
            start = self._position
            chunk = self._images[start : start + self._batch_size]
            self._position += len(chunk)
            arrays = []
            for i, item in enumerate(chunk, start):
                try:
                    arrays.append(load_input(item, i)[0])
                except ImageReadError as error:
                    name = Path(item).name if isinstance(item, (str, Path)) else f"image {i}"
                    if name not in self.unreadable:
                        self.unreadable.append(name)
                        self._warn(f"calibration: {error}; left out")
                    continue
                if isinstance(item, (str, Path)):
                    self.files.append(Path(item).name)
            if arrays:
                self.used += len(arrays)
                return {self._name: preprocess(arrays, self._size).numpy()}
        return None

    def rewind(self) -> None:
        self._position = 0


def quantize_onnx_int8(
    onnx_path: Path | str,
    out_path: Path | str,
    calibration_images: Path | str | Sequence[Any],
    max_images: int = 64,
    per_channel: bool = True,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Static int8 quantization (QDQ) calibrated on real images; writes ``out_path`` and its sidecar.

    ``calibration_images``: a folder, a dataset root or a list of paths/arrays; the first
    ``max_images`` are used (evenly spaced over the list). The sidecar names the image files calibrated
    on (``quantization.calibration_files``), so that the Dice check can leave them out, and those that
    could not be read (``calibration_unreadable``; each also said to ``warn``, by default the log).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, out = Path(onnx_path), Path(out_path)
    if out.suffix != ".onnx":
        raise ExportError(f"--out {out}: the file name must end in .onnx")
    meta = read_onnx_metadata(onnx_path)
    if meta.get("quantization"):
        raise ExportError(f"{onnx_path} is already quantized")
    images = collect_images(calibration_images)
    if len(images) > max_images:
        images = [images[int(i)] for i in np.linspace(0, len(images) - 1, max_images)]
    session = create_session(onnx_path)
    reader = _CalibrationReader(images, int(meta["image_size"]), session.get_inputs()[0].name, warn=warn)
    del session

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return reader.get_next()

    # onnxruntime.quantization logs one warning per shape tensor it leaves alone.
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared))

        def write(target: Path) -> None:
            quantize_static(
                str(prepared),
                str(target),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=CalibrationMethod.MinMax,
            )

        atomic_write(out, write)
    if reader.used == 0:
        out.unlink(missing_ok=True)
        raise ExportError(f"no readable calibration images in {calibration_images}")
    meta = dict(meta)
    meta["quantization"] = {
        "method": "static QDQ, per-channel int8 weights, uint8 activations, min-max calibration",
        "calibration_images": reader.used,
        "calibration_source": str(calibration_images) if isinstance(calibration_images, (str, Path)) else "list",
        "calibration_files": sorted(set(reader.files)),  # what a Dice check must not validate on
        "calibration_unreadable": reader.unreadable,
        "fp32_model": onnx_path.name,
        "dice_change": None,
    }
    atomic_write_json(onnx_sidecar(out), meta)
    return out


@contextlib.contextmanager
def _quiet_logging(*names: str) -> Iterator[None]:
    """Only errors from the named loggers (the root logger when none is named) inside the block."""
    loggers = [logging.getLogger(name) for name in names] or [logging.getLogger()]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def record_dice_change(onnx_path: Path | str, result: dict[str, Any]) -> None:
    """Store a :func:`polypseg.inference.deploy.measure_dice_change` result in a quantized model's sidecar."""
    sidecar = onnx_sidecar(onnx_path)
    meta = read_onnx_metadata(onnx_path)
    meta.setdefault("quantization", {}).update(
        {
            "dice_change": result["dice_change"],
            "validation": {
                k: result[k]
                for k in (
                    "n",
                    "data",
                    "dice_reference",
                    "dice_candidate",
                    "calibration_excluded",
                    "calibration_overlap",
                )
                if k in result
            },
        }
    )
    atomic_write_json(sidecar, meta)


def cached_int8_path(checkpoint: Path | str, cache_dir: Path | str | None = None) -> Path:
    """Where a validated int8 model of ``checkpoint`` is kept in the cache (named by its content hash),
    for checkpoints whose own folder is not the place for it: a shipped model, a read-only folder."""
    from polypseg.models.checkpoint import checkpoint_paths

    weights, _ = checkpoint_paths(checkpoint)
    return _cache_entry(_fingerprint(weights), cache_dir).with_suffix(".int8.onnx")


def find_validated_int8(checkpoint: Path | str, cache_dir: Path | str | None = None) -> Path | None:
    """A validated int8 model of exactly this checkpoint's content: ``NAME.int8.onnx`` beside it, else
    the cache's copy (:func:`keep_validated_int8`); None if neither is validated."""
    for path in (int8_path_for(checkpoint), cached_int8_path(checkpoint, cache_dir)):
        if path.is_file() and int8_validated(path, checkpoint):
            return path
    return None


def keep_validated_int8(int8_path: Path | str, checkpoint: Path | str, cache_dir: Path | str | None = None) -> Path:
    """Copy a validated int8 model (and its sidecar) to :func:`cached_int8_path`, so that
    ``backend="auto"`` finds it wherever ``polypseg export --out`` put it. Returns the cache path."""
    import shutil

    int8_path = Path(int8_path)
    target = cached_int8_path(checkpoint, cache_dir)
    if target.resolve() == int8_path.resolve():
        return target
    for source, destination in ((int8_path, target), (onnx_sidecar(int8_path), onnx_sidecar(target))):
        atomic_write(destination, lambda tmp, source=source: shutil.copyfile(source, tmp))
    return target


def int8_validated(int8_path: Path | str, checkpoint: Path | str | None = None) -> bool:
    """True if a quantized model's measured Dice change is within :data:`MAX_INT8_DICE_CHANGE`
    (and, given ``checkpoint``, it was made from that checkpoint's current weights)."""
    try:
        meta = read_onnx_metadata(int8_path)
    except ExportError:
        return False
    change = (meta.get("quantization") or {}).get("dice_change")
    if change is None or abs(float(change)) > MAX_INT8_DICE_CHANGE:
        return False
    return checkpoint is None or meta.get("source") == _fingerprint(Path(checkpoint))
