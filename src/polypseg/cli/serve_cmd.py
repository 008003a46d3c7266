"""``polypseg serve``: the web page and the JSON API in one process."""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path
from typing import Any

import typer

from polypseg.cli.common import UsageError, console, fail, resolve_device, warn
from polypseg.core.rules import threshold_problem
from polypseg.errors import PolypsegError

TOKEN_ENV = "POLYPSEG_TOKEN"
# Spelled out here (a test checks them against polypseg.inference.predictor.BACKENDS and
# polypseg.core.precision.PRECISIONS) so that parsing the options needs no torch.
SERVE_BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
SERVE_PRECISIONS = ("auto", "fp32", "bf16")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), or :class:`OSError`.

    ``serve`` binds before it loads the model, so a taken port fails at once with one line, and
    the address it prints is the one it really listens on.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn does; a live listener still blocks the port
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_server(web_app: Any, sock: socket.socket, *, host: str, port: int, log_level: str) -> None:
    """uvicorn on the already bound ``sock`` (tests replace this function)."""
    import uvicorn

    config = uvicorn.Config(web_app, host=host, port=port, log_level=log_level)
    uvicorn.Server(config).run(sockets=[sock])


def _bind_error(host: str, port: int, error: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is already in use (stop the other server, or choose another --port)"
    if error.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges; choose another --port)"
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: no such local address (--host)"
    return f"cannot listen on {where}: {error.strerror or error}"


def _model_label(model: Path | None) -> str:
    """How messages name the served model: ``model PATH``, or the shipped model when none was given."""
    return "the shipped model" if model is None else f"model {model}"


def _check_samples(folder: Path) -> None:
    """Stop when ``--samples`` is not a folder; warn in one line when it holds no images (in any of
    the data-set layouts ``data check`` knows), since the page's sample list would be empty."""
    from polypseg.data.pairing import LAYOUTS
    from polypseg.web.routers.samples import list_images, sample_folders

    if not folder.is_dir():
        fail(f"--samples {folder}: not a folder")
    images, _ = sample_folders(folder)
    if not list_images(images):
        layouts = ", ".join(f"{i}/" for i, _ in LAYOUTS)
        warn(f"--samples {folder}: no images in it (nor in {layouts}); the page's sample list is empty")


def _check_review_dir(folder: Path) -> None:
    """Create the review folder and read its ``review.json``, or stop with one line (before the
    model loads); warn when it cannot be written (reviews can still be read and exported, every
    save answers a clear error)."""
    import os

    from polypseg.data.review import ReviewStore

    if folder.exists() and not folder.is_dir():
        fail(f"--review-dir {folder}: a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"--review-dir {folder}: cannot create it ({error.strerror or error})")
    try:
        ReviewStore(folder)
    except PolypsegError as error:
        fail(f"--review-dir {folder}: {error}")
    if not os.access(folder, os.W_OK):
        console.print(
            f"[bold yellow]warning:[/] --review-dir {folder} is read-only: verdicts and masks cannot be saved.",
            highlight=False,
            soft_wrap=True,
            markup=True,
        )


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: Path | None = typer.Option(
            None,
            "--model",
            "-m",
            help="Checkpoint (NAME.safetensors), CV run folder (fold ensemble) or a shipped model's name. Default: the shipped model (polypseg models).",
        ),
        host: str = typer.Option(
            "127.0.0.1", help="Address to bind. Anything but loopback exposes the server to the network."
        ),
        port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free port)."),
        token: str | None = typer.Option(
            None,
            envvar=TOKEN_ENV,
            help=f"Require 'Authorization: Bearer TOKEN' on every /v1 call (or set {TOKEN_ENV}).",
        ),
        device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
        backend: str = typer.Option(
            "torch",
            help="Segmentation backend: torch, onnxruntime or openvino (faster on CPU; Grad-CAM still runs in torch), "
            "or auto (torch on CUDA; on CPU OpenVINO if installed, else onnxruntime).",
        ),
        precision: str = typer.Option(
            "auto",
            "--precision",
            help="Segmentation (torch, openvino) and Grad-CAM: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16.",
        ),
        tta: bool = typer.Option(False, "--tta/--no-tta", help="Flip test-time augmentation (segmentation only)."),
        threshold: float | None = typer.Option(
            None, help="Default threshold, 0 < t < 1; default: the run's (or checkpoint's)."
        ),
        max_upload_mb: float = typer.Option(20.0, min=0.1, help="Largest accepted upload, in MB."),
        max_pixels: int = typer.Option(
            40_000_000, min=1, help="Largest accepted image, in pixels (stops decompression bombs)."
        ),
        max_queue: int = typer.Option(64, min=1, help="Requests waiting at most; more get 503 with Retry-After."),
        max_batch: int = typer.Option(8, min=1, help="Requests run together as one batch at most."),
        max_video_frames: int = typer.Option(
            300, min=1, help="Frames of an uploaded video segmented at most (the first ones)."
        ),
        timeout: float = typer.Option(120.0, min=1.0, help="Seconds a request may wait for its answer before 503."),
        samples: Path | None = typer.Option(
            None, help="Folder of images offered as samples on the page (default: the bundled Kvasir-SEG sample)."
        ),
        review_dir: Path | None = typer.Option(
            None,
            "--review-dir",
            help="Keep reviewers' verdicts, notes and corrected masks in this folder (created if missing); "
            "it becomes a data set (images/ + masks/) that 'polypseg data check' and 'polypseg train' accept.",
        ),
        log_level: str = typer.Option("info", help="uvicorn log level."),
    ) -> None:
        """Serve the web page and the HTTP API (POST /v1/segment, /v1/explain; GET /v1/health, /v1/model; docs at /docs)."""
        from polypseg.web.app import WebSettings, create_app
        from polypseg.web.service import InferenceService

        token = token or None
        if backend not in SERVE_BACKENDS:
            fail(f"--backend {backend}: choose {', '.join(SERVE_BACKENDS)}")
        if precision not in SERVE_PRECISIONS:
            fail(f"--precision {precision}: choose {', '.join(SERVE_PRECISIONS)}")
        if threshold is not None and threshold_problem(threshold) is not None:
            fail(f"--threshold {threshold_problem(threshold)}")
        if samples is not None:
            _check_samples(samples)
        if review_dir is not None:
            _check_review_dir(review_dir)
        # Bind first: a taken port fails in a second, before minutes of model loading.
        try:
            sock = bind_socket(host, port)
        except OSError as error:
            fail(_bind_error(host, port, error))
        port = sock.getsockname()[1]
        try:
            resolved = resolve_device(device)
            with console.status(f"loading {_model_label(model)}"):
                service = InferenceService.from_checkpoint(
                    model,
                    device=resolved,
                    backend=backend,
                    tta=tta,
                    threshold=threshold,
                    precision=precision,
                    max_queue=max_queue,
                    max_batch=max_batch,
                )
                service.warmup()
        except UsageError as error:
            sock.close()
            fail(str(error))
        except PolypsegError as error:
            sock.close()
            fail(f"cannot load {_model_label(model)}: {error}")
        except Exception as error:  # noqa: BLE001 - any load failure stops serve with one line
            sock.close()
            reason = str(error).splitlines()[0] if str(error) else ""
            fail(f"cannot load {_model_label(model)}: {type(error).__name__}: {reason}")

        settings = WebSettings(
            token=token,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            max_pixels=max_pixels,
            request_timeout=timeout,
            samples_dir=samples,
            max_video_frames=max_video_frames,
            review_dir=review_dir,
        )
        try:
            web_app = create_app(service, settings)
        except PolypsegError as error:
            sock.close()
            fail(f"--review-dir {review_dir}: {error}")
        if not is_loopback(host) and token is None:
            console.print(
                f"[bold yellow]warning:[/] listening on {host} without authentication: anyone who can reach this "
                f"port can use the model. Set --token or {TOKEN_ENV}.",
                highlight=False,
                soft_wrap=True,
                markup=True,
            )
        shown = f"[{host}]" if ":" in host else host
        console.print(
            f"serving {service.describe()['architecture']['encoder']} x{service.n_models} on {service.device}: "
            f"page http://{shown}:{port}/  API docs http://{shown}:{port}/docs",
            highlight=False,
            soft_wrap=True,
        )
        try:
            run_server(web_app, sock, host=host, port=port, log_level=log_level)
        finally:
            sock.close()
