"""``GET /v1/samples``, ``/v1/samples/{name}`` and ``/v1/samples/{name}/mask``: the sample images of the page.

A samples folder is found by the data-set layouts of :data:`polypseg.data.pairing.LAYOUTS` (the one
rule that ``data check`` and training use), so a CVC-ClinicDB folder serves as well as Kvasir-SEG.
Sample images are served as stored (the page sends them to ``/v1/segment``, which reads TIFF);
ground-truth masks that browsers cannot show (TIFF) are served as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from polypseg.data.images import read_mask
from polypseg.data.pairing import IMAGE_EXTENSIONS, LAYOUTS
from polypseg.errors import PolypsegError
from polypseg.web.api_errors import ApiError
from polypseg.web.dependencies import TOKEN_REQUIRED, SamplesDirDep
from polypseg.web.encoding import mask_to_uint8, png_bytes
from polypseg.web.schemas import ERROR_RESPONSES, ErrorBody

# Mask formats a browser cannot display: served converted to PNG (0/255), read by the library's mask rule.
BROWSER_UNREADABLE = (".tif", ".tiff")

router = APIRouter(prefix="/v1", tags=["samples"], dependencies=TOKEN_REQUIRED, responses={401: ERROR_RESPONSES[401]})


@router.get("/samples")
async def samples(samples_dir: SamplesDirDep) -> dict[str, Any]:
    """Names of the sample images (by default the bundled Kvasir-SEG sample; see its NOTICE), and
    which of them have a ground-truth mask (``GET /v1/samples/{name}/mask``)."""
    images, masks = sample_folders(samples_dir)
    names = [p.name for p in list_images(images)]
    stems = mask_index(masks)
    return {"samples": names, "masks": [n for n in names if Path(n).stem in stems]}


_NOT_FOUND = {404: {"model": ErrorBody, "description": "No sample of that name (or it has no ground-truth mask)"}}


@router.get("/samples/{name}", responses=_NOT_FOUND)
async def sample(name: str, samples_dir: SamplesDirDep) -> FileResponse:
    """One sample image, by name as listed by ``GET /v1/samples``."""
    images, _ = sample_folders(samples_dir)
    by_name = {p.name: p for p in list_images(images)}
    if name not in by_name:
        raise ApiError(404, f"no sample named '{name}'", "not_found")
    return FileResponse(by_name[name])


_MASK_RESPONSES = {**_NOT_FOUND, 200: {"content": {"image/png": {}}, "description": "The ground-truth mask"}}


@router.get("/samples/{name}/mask", responses=_MASK_RESPONSES)
async def sample_mask(name: str, samples_dir: SamplesDirDep) -> Response:
    """The ground-truth mask of one sample image (same file stem in the data set's masks folder);
    a TIFF mask, which browsers cannot show, comes as an 8-bit PNG of 0/255."""
    images, masks = sample_folders(samples_dir)
    if name not in {p.name for p in list_images(images)}:
        raise ApiError(404, f"no sample named '{name}'", "not_found")
    path = mask_index(masks).get(Path(name).stem)
    if path is None:
        raise ApiError(404, f"sample '{name}' has no ground-truth mask", "not_found")
    if path.suffix.lower() not in BROWSER_UNREADABLE:
        return FileResponse(path)
    try:
        png = await run_in_threadpool(lambda: png_bytes(mask_to_uint8(read_mask(path))))
    except PolypsegError:
        raise ApiError(404, f"sample '{name}': its ground-truth mask cannot be read", "not_found") from None
    return Response(png, media_type="image/png")


def default_samples_dir() -> Path | None:
    """The bundled Kvasir-SEG sample's images, or ``None`` when it cannot be found."""
    try:
        from polypseg.data.sample_data import sample_dataset_path

        return sample_dataset_path() / "images"
    except Exception:  # noqa: BLE001 - samples are a convenience; the API works without them
        return None


def sample_folders(folder: Path | None) -> tuple[Path | None, Path | None]:
    """(images, masks) of a samples folder: a data set folder in one of the layouts of
    :data:`~polypseg.data.pairing.LAYOUTS` (``images/`` + ``masks/``, ``Original/`` + ``Ground Truth/``;
    the masks folder may be missing), or an images folder whose sibling masks folder of that layout
    (``masks/`` by default) holds the ground truth."""
    if folder is None:
        return None, None
    for images_name, masks_name in LAYOUTS:
        if (folder / images_name).is_dir():
            return folder / images_name, folder / masks_name
    return folder, folder.parent / dict(LAYOUTS).get(folder.name, "masks")


def mask_index(masks: Path | None) -> dict[str, Path]:
    """Ground-truth masks by file stem."""
    return {p.stem: p for p in list_images(masks)}


def list_images(folder: Path | None) -> list[Path]:
    """The image files of ``folder`` (no hidden files), sorted; empty when there is no such folder."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
