"""``polypseg serve``: the web page and the JSON API in one process."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from polypseg.cli.common import UsageError, console, fail, resolve_device
from polypseg.errors import PolypsegError

TOKEN_ENV = "POLYPSEG_TOKEN"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: Path = typer.Option(..., "--model", "-m", help="Checkpoint (NAME.safetensors) or CV run folder (fold ensemble)."),
        host: str = typer.Option("127.0.0.1", help="Address to bind. Anything but loopback exposes the server to the network."),
        port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free port)."),
        token: str | None = typer.Option(
            None, envvar=TOKEN_ENV, help=f"Require 'Authorization: Bearer TOKEN' on every /v1 call (or set {TOKEN_ENV})."
        ),
        device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
        backend: str = typer.Option(
            "torch",
            help="Segmentation backend: torch, onnxruntime (faster on CPU; Grad-CAM still runs in torch) or auto.",
        ),
        tta: bool = typer.Option(False, "--tta/--no-tta", help="Flip test-time augmentation (segmentation only)."),
        threshold: float | None = typer.Option(None, min=0.0, max=1.0, help="Default threshold; default: the checkpoint's."),
        max_upload_mb: float = typer.Option(20.0, min=0.1, help="Largest accepted upload, in MB."),
        max_pixels: int = typer.Option(40_000_000, min=1, help="Largest accepted image, in pixels (stops decompression bombs)."),
        max_queue: int = typer.Option(64, min=1, help="Requests waiting at most; more get 503 with Retry-After."),
        max_batch: int = typer.Option(8, min=1, help="Requests run together as one batch at most."),
        max_video_frames: int = typer.Option(300, min=1, help="Frames of an uploaded video segmented at most (the first ones)."),
        timeout: float = typer.Option(120.0, min=1.0, help="Seconds a request may wait for its answer before 503."),
        samples: Path | None = typer.Option(None, help="Folder of images offered as samples on the page (default: the bundled Kvasir-SEG sample)."),
        log_level: str = typer.Option("info", help="uvicorn log level."),
    ) -> None:
        """Serve the web page and the HTTP API (POST /v1/segment, /v1/explain; GET /v1/health, /v1/model; docs at /docs)."""
        import uvicorn

        from polypseg.web.app import WebSettings, create_app
        from polypseg.web.service import InferenceService

        token = token or None
        if backend not in ("torch", "onnxruntime", "auto"):
            fail(f"--backend {backend}: choose torch, onnxruntime or auto")
        if samples is not None and not samples.is_dir():
            fail(f"--samples {samples}: not a folder")
        try:
            resolved = resolve_device(device)
            with console.status(f"loading {model}"):
                service = InferenceService.from_checkpoint(
                    model, device=resolved, backend=backend, tta=tta, threshold=threshold, max_queue=max_queue, max_batch=max_batch
                )
                service.warmup()
        except UsageError as error:
            fail(str(error))
        except PolypsegError as error:
            fail(f"cannot load model {model}: {error}")
        except Exception as error:  # noqa: BLE001 - any load failure stops serve with one line
            fail(f"cannot load model {model}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")

        settings = WebSettings(
            token=token,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            max_pixels=max_pixels,
            request_timeout=timeout,
            samples_dir=samples,
            max_video_frames=max_video_frames,
        )
        web_app = create_app(service, settings)
        if not is_loopback(host) and token is None:
            console.print(
                f"[bold yellow]warning:[/] listening on {host} without authentication: anyone who can reach this "
                f"port can use the model. Set --token or {TOKEN_ENV}.",
                highlight=False,
                soft_wrap=True,
            )
        shown = f"[{host}]" if ":" in host else host
        console.print(
            f"serving {service.describe()['architecture']['encoder']} x{service.n_models} on {service.device}: "
            f"page http://{shown}:{port}/  API docs http://{shown}:{port}/docs",
            highlight=False,
            soft_wrap=True,
        )
        uvicorn.run(web_app, host=host, port=port, log_level=log_level)
