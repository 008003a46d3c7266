"""The model behind the web app: one worker thread, a bounded queue, micro-batching.

Request handlers never touch the model. They reserve a slot (:meth:`InferenceService.reserve`),
which fails fast with :class:`ServiceBusy` when the queue or the pixel budget is full, then
submit a job and wait on its future. The worker takes up to ``max_batch`` queued jobs at once
and runs each kind (segment / explain) as one batch, so concurrent clients share the device
and memory stays bounded by ``max_queue`` and ``max_pending_pixels``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polypseg.core.runs import RunDir, fold_name, parse_fold_name
from polypseg.errors import PolypsegError

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BATCH = 8
# Decoded uploads waiting in the queue (uint8 RGB, 3 bytes a pixel) plus their full-size outputs.
DEFAULT_MAX_PENDING_PIXELS = 200_000_000


_DEFAULT: Any = object()


class ServiceBusy(PolypsegError):
    """The queue or the memory budget is full; the client should retry later (HTTP 503)."""


class ExplainUnavailable(PolypsegError):
    """Grad-CAM needs a torch model and the service has none (an ONNX file was served)."""


class BadExplainRequest(PolypsegError):
    """An explain option that does not fit the served model (e.g. a fold it does not have)."""


@dataclass
class ExplainResult:
    heatmap: np.ndarray  # float32 (H, W) in [0, 1]
    probability: np.ndarray  # float32 (H, W): the served (ensemble) probability whose mask is explained
    models: list[int] = field(default_factory=list)  # indices of the explained models


class Ticket:
    """A reserved queue slot and pixel budget; released once, by the worker or on error."""

    def __init__(self, service: InferenceService, pixels: int) -> None:
        self._service = service
        self.pixels = pixels
        self._released = False

    def release(self) -> None:
        with self._service._lock:
            if not self._released:
                self._released = True
                self._service._pending -= 1
                self._service._pending_pixels -= self.pixels

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.release()


@dataclass
class _Job:
    kind: str
    image: np.ndarray
    threshold: float
    ticket: Ticket
    fold: int | None = None
    future: Future = field(default_factory=Future)


class InferenceService:
    """Owns a :class:`polypseg.inference.predictor.Predictor` and runs it from a single worker thread.

    Grad-CAM explains the mask the service serves: the target is each model's logits summed inside
    the *served* mask (the ensemble's mean probability >= threshold, at the model's input size), so
    the heatmap explains exactly the mask ``segment`` answers at that threshold. For an ensemble,
    every fold model is explained with that same target and the heatmaps are averaged (or one
    fold's only, on request). For a single model this is the paper's target (its own mask).
    """

    def __init__(
        self,
        predictor: Any,
        *,
        source: Path | str | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending_pixels: int = DEFAULT_MAX_PENDING_PIXELS,
        batch_wait: float = 0.005,
        explain_layer: str = "decoder.final",
        explain_model: Any = _DEFAULT,
        explain_models: Any = _DEFAULT,
        precision: str = "auto",
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be at least 1")
        self.predictor = predictor
        self.source = Path(source) if source is not None else None
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_pending_pixels = max_pending_pixels
        self.batch_wait = batch_wait
        self.explain_layer = explain_layer
        self.precision = precision  # Grad-CAM's (polypseg.core.precision); segmentation's is the predictor's
        # Grad-CAM needs torch models: by default the predictor's own (every fold of an ensemble).
        if explain_models is _DEFAULT:
            if explain_model is _DEFAULT:
                explain_models = list(getattr(predictor, "models", None) or [])
            else:
                explain_models = [] if explain_model is None else [explain_model]
        self.explain_models: list[Any] = list(explain_models or [])
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._pending_pixels = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.completed = 0
        self.batches = 0
        self.started_at = time.time()

    @classmethod
    def from_checkpoint(
        cls,
        path: Path | str | None = None,
        device: str = "auto",
        backend: str = "torch",
        tta: bool = False,
        threshold: float | None = None,
        precision: str = "auto",
        **options: Any,
    ) -> InferenceService:
        """Load a checkpoint, CV run folder or shipped model (``None``: the default one); see
        :meth:`polypseg.inference.predictor.Predictor.from_checkpoint`.

        Grad-CAM needs the torch model: with ``backend="onnxruntime"`` (or ``"auto"`` on CPU)
        segmentation runs in onnxruntime and the first checkpoint is also loaded in torch for
        ``explain``. An ``.onnx`` file alone serves segmentation only. ``precision`` (auto, fp32,
        bf16) applies to segmentation (torch, openvino; onnxruntime computes in fp32) and to Grad-CAM alike.
        """
        from polypseg.inference.loading import PredictorError, engine_precision_problem
        from polypseg.inference.predictor import Predictor
        from polypseg.models.checkpoint import find_checkpoints, load_checkpoint
        from polypseg.models.pretrained import resolve_model

        path = resolve_model(path)
        if Path(path).suffix == ".onnx" and backend == "torch":
            backend = "onnxruntime"  # an exported model has no torch weights to load
        problem = engine_precision_problem(backend, precision)
        if Path(path).suffix == ".onnx" and problem is not None:
            # Checkpoints keep precision for Grad-CAM; an exported model has none, so it would apply to nothing.
            raise PredictorError(
                f"precision {precision}: {problem}, and {Path(path).name} has no Grad-CAM for it to apply to; "
                "use backend 'openvino' or 'auto'"
            )
        # onnxruntime segments in fp32 (int8 for a quantised model); precision is then Grad-CAM's alone
        segmentation_precision = "auto" if backend == "onnxruntime" else precision
        predictor = Predictor.from_checkpoint(
            path, device=device, backend=backend, tta=tta, threshold=threshold, precision=segmentation_precision
        )
        explain_models: list[Any] = list(predictor.models)
        if not explain_models and Path(path).suffix != ".onnx":
            # onnxruntime segments; Grad-CAM needs every fold's torch weights to explain the ensemble's mask.
            explain_models = [load_checkpoint(c, device=predictor.device).model.eval() for c in find_checkpoints(path)]
        return cls(predictor, source=path, explain_models=explain_models, precision=precision, **options)

    def _explain_precision(self) -> str:
        """What Grad-CAM computes in on this device: ``self.precision`` resolved (auto -> bf16 or fp32)."""
        from polypseg.core.precision import resolve_precision

        return resolve_precision(self.precision, self.predictor.device)

    @property
    def explain_model(self) -> Any:
        """The first model Grad-CAM can use (``None`` when serving an ONNX file)."""
        return self.explain_models[0] if self.explain_models else None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="polypseg-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the jobs already queued, then stop the worker."""
        if self._thread is None:
            return
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def warmup(self) -> None:
        """Run one small image through segmentation and Grad-CAM, so a broken model fails at start."""
        image = np.full((32, 32, 3), 128, dtype=np.uint8)
        self._compute("segment", self.threshold, [image])
        if self.explain_models:
            # a threshold just above 0 gives a non-empty target, so the backward pass really runs
            self._compute("explain", 1e-6, [image])

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending

    # ------------------------------------------------------------------ submitting

    def reserve(self, pixels: int) -> Ticket:
        """Reserve a queue slot for an image of ``pixels`` pixels, or raise :class:`ServiceBusy`."""
        with self._lock:
            if not self.alive or self._stopping.is_set():
                raise ServiceBusy("the inference worker is not running")
            if self._pending >= self.max_queue:
                raise ServiceBusy("server busy, retry later")
            # A single image larger than the whole budget still runs when nothing else waits.
            if self._pending and self._pending_pixels + pixels > self.max_pending_pixels:
                raise ServiceBusy("server busy, retry later")
            self._pending += 1
            self._pending_pixels += pixels
        return Ticket(self, pixels)

    def check_explain(self, fold: int | None = None) -> None:
        """Raise unless ``explain`` can run here with ``fold`` (``None``: every model)."""
        if not self.explain_models:
            raise ExplainUnavailable("Grad-CAM needs a polypseg checkpoint; this server runs an ONNX model")
        if fold is not None and not 0 <= fold < len(self.explain_models):
            have = f"folds 0-{len(self.explain_models) - 1}" if len(self.explain_models) > 1 else "one model (fold 0)"
            raise BadExplainRequest(f"invalid fold: {fold} (this server has {have})")

    def submit(
        self, ticket: Ticket, kind: str, image: np.ndarray, threshold: float | None = None, fold: int | None = None
    ) -> Future:
        """Queue ``kind`` (``"segment"`` or ``"explain"``) for one RGB ``uint8`` image.

        ``fold`` (explain only) restricts Grad-CAM to one model of the ensemble.
        """
        if kind not in ("segment", "explain"):
            ticket.release()
            raise ValueError(f"unknown job kind '{kind}'")
        if kind == "explain":
            try:
                self.check_explain(fold)
            except PolypsegError:
                ticket.release()
                raise
        job = _Job(
            kind,
            image,
            float(self.threshold if threshold is None else threshold),
            ticket,
            fold if kind == "explain" else None,
        )
        self._queue.put(job)
        return job.future

    def run(
        self,
        kind: str,
        image: np.ndarray,
        threshold: float | None = None,
        timeout: float | None = None,
        fold: int | None = None,
    ) -> Any:
        """Reserve, submit and wait: the blocking form, for scripts and tests."""
        ticket = self.reserve(int(image.shape[0]) * int(image.shape[1]))
        return self.submit(ticket, kind, image, threshold, fold).result(timeout)

    def segment_stream(
        self, frames: Iterable[np.ndarray], threshold: float | None = None, timeout: float = 120.0
    ) -> Iterator[Any]:
        """Segment a stream of frames (a video) through the shared queue, ``max_batch`` at a time.

        Only one chunk of frames is decoded and queued at once, so a long video holds bounded
        memory and leaves room in the queue for other clients. The first chunk fails fast with
        :class:`ServiceBusy` when the queue is full; later chunks wait for room. ``timeout`` bounds
        each chunk, not the whole video, so a long video is not refused for being long.
        """
        chunk: list[np.ndarray] = []
        first = True

        def flush() -> list[Any]:
            nonlocal first
            deadline = time.monotonic() + timeout
            futures = []
            try:
                for frame in chunk:
                    pixels = int(frame.shape[0]) * int(frame.shape[1])
                    ticket = self.reserve(pixels) if first else self._reserve_waiting(pixels, deadline)
                    first = False
                    futures.append(self.submit(ticket, "segment", frame, threshold))
                return [f.result(max(0.0, deadline - time.monotonic())) for f in futures]
            except FutureTimeout:
                raise ServiceBusy(f"no answer within {timeout:g} s, retry later") from None
            finally:  # on any failure, frames already queued for this request are not computed
                for f in futures:
                    f.cancel()

        for frame in frames:
            chunk.append(frame)
            if len(chunk) == self.max_batch:
                yield from flush()
                chunk = []
        if chunk:
            yield from flush()

    def _reserve_waiting(self, pixels: int, deadline: float) -> Ticket:
        while True:
            try:
                return self.reserve(pixels)
            except ServiceBusy:
                if time.monotonic() > deadline or not self.alive:
                    raise
                time.sleep(0.02)

    # ------------------------------------------------------------------ model facts

    @property
    def threshold(self) -> float:
        return float(self.predictor.threshold)

    @property
    def device(self) -> str:
        return str(self.predictor.device)

    @property
    def n_models(self) -> int:
        return int(getattr(self.predictor, "n_models", None) or len(self.predictor.models))

    def describe(self) -> dict[str, Any]:
        """Model card for ``GET /v1/model``: architecture, training data, metrics, threshold."""
        from polypseg._version import __version__
        from polypseg.models.factory import count_parameters

        metadata = dict(getattr(self.predictor, "metadata", {}) or {})
        config = metadata.get("config", {})
        model_cfg = config.get("model", {})
        train_cfg = config.get("train", {})
        run_dir = self._run_dir()
        settings = RunDir(run_dir).read_settings() if run_dir is not None else None
        data = (settings.data if settings is not None else None) or metadata.get("data")
        info: dict[str, Any] = {
            "polypseg_version": __version__,
            "source": self.source.name if self.source is not None else None,
            "architecture": {
                "arch": model_cfg.get("arch"),
                "encoder": model_cfg.get("encoder"),
                "decoder_channels": model_cfg.get("decoder_channels"),
                "skip_connections": model_cfg.get("skip_connections"),
                "parameters": count_parameters(self.explain_model) if self.explain_model is not None else None,
                "input_size": int(self.predictor.image_size),
                "output": "sigmoid probability of polyp per pixel",
            },
            "ensemble": {"models": self.n_models, "combine": "mean probability" if self.n_models > 1 else None},
            "training": {
                "recipe": train_cfg.get("recipe"),
                "epochs": train_cfg.get("epochs"),
                "loss": train_cfg.get("loss"),
                "image_size": train_cfg.get("image_size"),
                # The dataset folder's name only: absolute server paths are not the client's business.
                "data": Path(str(data)).name if data else None,
                "folds": settings.folds if settings is not None else None,
            },
            "threshold": self.threshold,
            "metrics": self._metrics(metadata, run_dir),
            "explain": {
                "layer": self.explain_layer,
                "method": "gradcam",
                "target": "sum of each model's logits inside the served mask (probability >= threshold)",
                "models": len(self.explain_models),
                "combine": "mean of the per-model heatmaps" if len(self.explain_models) > 1 else None,
            }
            if self.explain_models
            else None,
            "device": self.device,
            "backend": str(getattr(self.predictor, "backend", "torch")),
            "precision": {
                "segmentation": str(getattr(self.predictor, "precision", "fp32")),
                "explain": self._explain_precision() if self.explain_models else None,
            },
            "tta": bool(getattr(self.predictor, "tta", False)),
        }
        summary = metadata.get("summary") or ((RunDir(run_dir).read_summary() or {}) if run_dir is not None else {})
        if summary:
            info["cross_validation"] = {
                key: summary[key]
                for key in ("n_images", "folds", "threshold", "threshold_selection", "mean_std", "explainability")
                if key in summary
            }
            if "auc" in summary.get("pooled", {}):
                info["cross_validation"]["pooled_auc"] = summary["pooled"]["auc"]
        return info

    def _metrics(self, metadata: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
        """Per-model metrics: the checkpoint's own (inner validation) and, inside a CV run, the held-out fold's.

        One checkpoint: ``{"validation": {...}, "test": {...}}``. An ensemble: the same per fold,
        under ``"fold_K"``. ``test`` holds the fold's held-out metrics at the served threshold when
        it was evaluated there, else at 0.5 (``test.threshold`` says which).
        """
        checkpoints = [Path(str(c)) for c in metadata.get("checkpoints", [])]
        stored = metadata.get("metrics") or {}
        if not checkpoints:
            return dict(stored)
        per_model: dict[str, Any] = {}
        for path in checkpoints:
            fold = _fold_name(path)
            own = stored.get(fold, {}) if len(checkpoints) > 1 else stored
            entry: dict[str, Any] = {"validation": {k: v for k, v in (own or {}).items() if _is_number(v)}}
            test = _fold_test_metrics(path.parent / "metrics.json", self.threshold)
            if test:
                entry["test"] = test
            per_model[fold or path.stem] = entry
        if len(checkpoints) == 1:
            return next(iter(per_model.values()))
        return per_model

    def _run_dir(self) -> Path | None:
        if self.source is None:
            return None
        source = self.source
        for candidate in (source, source.parent, source.parent.parent):
            run = RunDir(candidate)
            if candidate.is_dir() and run.config_path.is_file() and run.splits_path.is_file():  # a CV run
                return candidate
        return None

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.batch_wait
            stop_after = False
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop_after = True
                    break
                batch.append(item)
            live = []
            for item in batch:
                if item.future.set_running_or_notify_cancel():
                    live.append(item)
                else:  # the client gave up waiting
                    item.ticket.release()
            try:
                self._process(live)
            finally:
                for j in batch:
                    j.ticket.release()
            if stop_after:
                return

    def _process(self, jobs: list[_Job]) -> None:
        groups: dict[tuple[str, float, int | None], list[_Job]] = {}
        for job in jobs:
            # Segmentation thresholds are applied after the model, so all segment jobs share a
            # batch; Grad-CAM's target depends on the threshold (and the models explained), so
            # explain jobs group by those.
            key = ("segment", 0.0, None) if job.kind == "segment" else ("explain", job.threshold, job.fold)
            groups.setdefault(key, []).append(job)
        for (kind, threshold, fold), group in groups.items():
            self._run_group(kind, threshold, group, fold)
        self.batches += 1

    def _run_group(self, kind: str, threshold: float, jobs: list[_Job], fold: int | None = None) -> None:
        try:
            results = self._compute(kind, threshold, [j.image for j in jobs], fold)
        except Exception as error:
            if len(jobs) > 1:
                self._empty_device_cache()
                for job in jobs:
                    self._run_group(kind, threshold, [job], fold)
                return
            log.exception("inference failed")
            jobs[0].future.set_exception(self._as_client_error(error))
            return
        for job, result in zip(jobs, results, strict=False):
            if kind == "segment" and abs(job.threshold - self.threshold) > 1e-12:
                result = result.with_threshold(job.threshold)
            job.future.set_result(result)
            self.completed += 1

    def _compute(self, kind: str, threshold: float, images: list[np.ndarray], fold: int | None = None) -> list[Any]:
        if kind == "segment":
            return list(self.predictor.predict(images))
        return self._explain(threshold, images, fold)

    def _explain(self, threshold: float, images: list[np.ndarray], fold: int | None) -> list[ExplainResult]:
        """Grad-CAM of the served mask: target = logits inside ``served probability >= threshold``.

        The served probability is the predictor's (ensemble mean, with TTA if enabled) at the
        model's input size; every explained model gets that same region as its target, and the
        per-model heatmaps (each divided by its maximum) are averaged.
        """
        import torch

        from polypseg.data.images import resize_image
        from polypseg.explain.gradcam import GradCAMDriver, RegionLogitSum, to_original_size

        size = int(self.predictor.image_size)
        device = self.predictor.device
        resized = np.stack([img if img.shape[:2] == (size, size) else resize_image(img, size) for img in images])
        served = torch.from_numpy(np.ascontiguousarray(self.predictor.predict_resized(resized)))  # (N, S, S)
        region = (served >= threshold).to(device)
        indices = list(range(len(self.explain_models))) if fold is None else [fold]
        total: torch.Tensor | None = None
        for index in indices:
            with GradCAMDriver(
                self.explain_models[index],
                self.explain_layer,
                device=device,
                batch_size=len(resized),
                precision=self.precision,
            ) as driver:
                maps = driver.run(resized, RegionLogitSum(region)).heatmaps.float()
            total = maps if total is None else total + maps
        assert total is not None
        mean = total / len(indices)
        results = []
        for i, image in enumerate(images):
            heatmap, probability = to_original_size(mean[i], served[i], image.shape[:2])
            results.append(ExplainResult(heatmap, probability, indices))
        return results

    @staticmethod
    def _as_client_error(error: Exception) -> Exception:
        if type(error).__name__ == "OutOfMemoryError":
            return ServiceBusy("out of device memory, retry later")
        return error

    def _empty_device_cache(self) -> None:
        if str(self.device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _fold_name(checkpoint: Path) -> str:
    index = parse_fold_name(checkpoint.parent.name)
    return fold_name(index) if index is not None else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fold_test_metrics(path: Path, threshold: float) -> dict[str, Any]:
    """A fold's held-out metrics (``fold_K/metrics.json`` of a CV run) at ``threshold`` or else 0.5."""
    data = _read_json(path) if path.is_file() else {}
    at = data.get("at")
    if not isinstance(at, dict) or not at:
        return {}
    key = next((k for k in at if abs(float(k) - threshold) < 1e-9), None) or ("0.5" if "0.5" in at else None)
    if key is None:
        return {}
    values = {k: v for k, v in at[key].items() if _is_number(v)} if isinstance(at[key], dict) else {}
    n_images = data.get("n_test", data.get("n_images"))
    return {"threshold": float(key), "n_images": n_images, **values}


def _read_json(path: Path) -> dict[str, Any]:
    from polypseg.core.io_utils import read_json

    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
