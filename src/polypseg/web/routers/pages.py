"""The page of our own (``/``), its favicon, the offline API docs (``/docs``) and the static folders.

Everything is served from this process: page assets from ``web/static`` and the OpenAPI docs
assets from the ``fastapi-offline`` package, so nothing is ever loaded from another host.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(str(files("polypseg.web") / "static"))

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/favicon.ico")
async def favicon() -> Response:
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


@router.get("/docs")
async def docs(request: Request) -> Response:
    """Swagger UI from the bundled assets; without them, the raw OpenAPI document."""
    if request.app.state.docs_assets is None:
        return RedirectResponse("/openapi.json")
    return FileResponse(STATIC_DIR / "docs.html", media_type="text/html")


def mount_static(app: FastAPI) -> None:
    """Serve ``web/static`` at ``/static`` and, when ``fastapi-offline`` is installed, its Swagger UI
    assets at ``/docs-assets``; records the latter in ``app.state.docs_assets``."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    docs_assets = offline_docs_dir()
    if docs_assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=docs_assets), name="docs-assets")
    app.state.docs_assets = docs_assets


def offline_docs_dir() -> Path | None:
    """Swagger UI assets shipped by the ``fastapi-offline`` package, if installed."""
    try:
        return Path(str(files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
