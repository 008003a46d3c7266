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


@dataclass
class ExplainResult:
    heatmap: np.ndarray  # float32 (H, W) in [0, 1]
    probability: np.ndarray  # float32 (H, W), from the explained model's own forward pass


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
    future: Future = field(default_factory=Future)


class InferenceService:
    """Owns a :class:`polypseg.inference.Predictor` and runs it from a single worker thread.

    Grad-CAM runs on one torch model (for a cross-validation ensemble: fold 0) with the paper's
    target, the logits summed inside the predicted mask at the requested threshold.
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
        # Grad-CAM runs on one torch model; for a fold ensemble, fold 0's.
        if explain_model is _DEFAULT:
            explain_model = predictor.models[0] if getattr(predictor, "models", None) else None
        self.explain_model = explain_model
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
        path: Path | str,
        device: str = "auto",
        backend: str = "torch",
        tta: bool = False,
        threshold: float | None = None,
        **options: Any,
    ) -> InferenceService:
        """Load a checkpoint or CV run folder; see :meth:`polypseg.inference.Predictor.from_checkpoint`.

        Grad-CAM needs the torch model: with ``backend="onnxruntime"`` (or ``"auto"`` on CPU)
        segmentation runs in onnxruntime and the first checkpoint is also loaded in torch for
        ``explain``. An ``.onnx`` file alone serves segmentation only.
        """
        from polypseg.checkpoint import find_checkpoints, load_checkpoint
        from polypseg.inference import Predictor

        if Path(path).suffix == ".onnx" and backend == "torch":
            backend = "onnxruntime"  # an exported model has no torch weights to load
        predictor = Predictor.from_checkpoint(path, device=device, backend=backend, tta=tta, threshold=threshold)
        explain_model = None
        if predictor.models:
            explain_model = predictor.models[0]
        elif Path(path).suffix != ".onnx":
            explain_model = load_checkpoint(find_checkpoints(path)[0], device=predictor.device).model
        return cls(predictor, source=path, explain_model=explain_model, **options)

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
        if self.explain_model is not None:
            self._compute("explain", self.threshold, [image])

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

    def submit(self, ticket: Ticket, kind: str, image: np.ndarray, threshold: float | None = None) -> Future:
        """Queue ``kind`` (``"segment"`` or ``"explain"``) for one RGB ``uint8`` image."""
        if kind not in ("segment", "explain"):
            ticket.release()
            raise ValueError(f"unknown job kind '{kind}'")
        if kind == "explain" and self.explain_model is None:
            ticket.release()
            raise ExplainUnavailable("Grad-CAM needs a polypseg checkpoint; this server runs an ONNX model")
        job = _Job(kind, image, float(self.threshold if threshold is None else threshold), ticket)
        self._queue.put(job)
        return job.future

    def run(self, kind: str, image: np.ndarray, threshold: float | None = None, timeout: float | None = None) -> Any:
        """Reserve, submit and wait: the blocking form, for scripts and tests."""
        ticket = self.reserve(int(image.shape[0]) * int(image.shape[1]))
        return self.submit(ticket, kind, image, threshold).result(timeout)

    def segment_stream(
        self, frames: Iterable[np.ndarray], threshold: float | None = None, timeout: float = 120.0
    ) -> Iterator[Any]:
        """Segment a stream of frames (a video) through the shared queue, ``max_batch`` at a time.

        Only one chunk of frames is decoded and queued at once, so a long video holds bounded
        memory and leaves room in the queue for other clients. The first chunk fails fast with
        :class:`ServiceBusy` when the queue is full; later chunks wait for room until ``timeout``.
        """
        deadline = time.monotonic() + timeout
        chunk: list[np.ndarray] = []
        first = True

        def flush() -> list[Any]:
            nonlocal first
            futures = []
            try:
                for frame in chunk:
                    pixels = int(frame.shape[0]) * int(frame.shape[1])
                    ticket = self.reserve(pixels) if first else self._reserve_waiting(pixels, deadline)
                    first = False
                    futures.append(self.submit(ticket, "segment", frame, threshold))
                return [f.result(max(0.0, deadline - time.monotonic())) for f in futures]
            except FutureTimeout:
                for f in futures:
                    f.cancel()
                raise ServiceBusy(f"no answer within {timeout:g} s, retry later") from None

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
        from polypseg import __version__
        from polypseg.models import count_parameters

        metadata = dict(getattr(self.predictor, "metadata", {}) or {})
        config = metadata.get("config", {})
        model_cfg = config.get("model", {})
        train_cfg = config.get("train", {})
        run_dir = self._run_dir()
        run_config = _read_json(run_dir / "config.json") if run_dir is not None else {}
        data = run_config.get("data") or metadata.get("data")
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
                "folds": run_config.get("folds"),
            },
            "threshold": self.threshold,
            "metrics": metadata.get("metrics") or {},
            "explain": {"layer": self.explain_layer, "method": "gradcam", "model_index": 0} if self.explain_model is not None else None,
            "device": self.device,
            "backend": str(getattr(self.predictor, "backend", "torch")),
            "tta": bool(getattr(self.predictor, "tta", False)),
        }
        summary = metadata.get("summary") or (_read_json(run_dir / "summary.json") if run_dir is not None else {})
        if summary:
            info["cross_validation"] = {
                key: summary[key]
                for key in ("n_images", "folds", "threshold", "threshold_selection", "mean_std", "explainability")
                if key in summary
            }
            if "auc" in summary.get("pooled", {}):
                info["cross_validation"]["pooled_auc"] = summary["pooled"]["auc"]
        return info

    def _run_dir(self) -> Path | None:
        if self.source is None:
            return None
        source = self.source
        for candidate in (source, source.parent, source.parent.parent):
            if candidate.is_dir() and (candidate / "config.json").is_file() and (candidate / "splits.json").is_file():
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
        groups: dict[tuple[str, float], list[_Job]] = {}
        for job in jobs:
            # Segmentation thresholds are applied after the model, so all segment jobs share a
            # batch; Grad-CAM's target depends on the threshold, so explain jobs group by it.
            key = ("segment", 0.0) if job.kind == "segment" else ("explain", job.threshold)
            groups.setdefault(key, []).append(job)
        for (kind, threshold), group in groups.items():
            self._run_group(kind, threshold, group)
        self.batches += 1

    def _run_group(self, kind: str, threshold: float, jobs: list[_Job]) -> None:
        try:
            results = self._compute(kind, threshold, [j.image for j in jobs])
        except Exception as error:  # noqa: BLE001 - isolate the failing request from the others
            if len(jobs) > 1:
                self._empty_device_cache()
                for job in jobs:
                    self._run_group(kind, threshold, [job])
                return
            log.exception("inference failed")
            jobs[0].future.set_exception(self._as_client_error(error))
            return
        for job, result in zip(jobs, results):
            if kind == "segment" and abs(job.threshold - self.threshold) > 1e-12:
                result = result.with_threshold(job.threshold)
            job.future.set_result(result)
            self.completed += 1

    def _compute(self, kind: str, threshold: float, images: list[np.ndarray]) -> list[Any]:
        if kind == "segment":
            return list(self.predictor.predict(images))
        from polypseg.explain import explain_images

        heatmaps, probabilities = explain_images(
            self.explain_model,
            images,
            image_size=self.predictor.image_size,
            threshold=threshold,
            layer=self.explain_layer,
            device=self.predictor.device,
            batch_size=len(images),
        )
        return [ExplainResult(h, p) for h, p in zip(heatmaps, probabilities)]

    @staticmethod
    def _as_client_error(error: Exception) -> Exception:
        if type(error).__name__ == "OutOfMemoryError":
            return ServiceBusy("out of device memory, retry later")
        return error

    def _empty_device_cache(self) -> None:
        if str(self.device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _read_json(path: Path) -> dict[str, Any]:
    from polypseg.io_utils import read_json

    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
