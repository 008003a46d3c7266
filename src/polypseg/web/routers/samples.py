"""``GET /v1/samples``, ``/v1/samples/{name}`` and ``/v1/samples/{name}/mask``: the sample images of the page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from polypseg.data.pairing import IMAGE_EXTENSIONS
from polypseg.web.api_errors import ApiError
from polypseg.web.dependencies import TOKEN_REQUIRED, SamplesDirDep
from polypseg.web.schemas import ERROR_RESPONSES, ErrorBody

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


@router.get("/samples/{name}/mask", responses=_NOT_FOUND)
async def sample_mask(name: str, samples_dir: SamplesDirDep) -> FileResponse:
    """The ground-truth mask of one sample image (same file stem in the data set's ``masks/`` folder)."""
    images, masks = sample_folders(samples_dir)
    if name not in {p.name for p in list_images(images)}:
        raise ApiError(404, f"no sample named '{name}'", "not_found")
    path = mask_index(masks).get(Path(name).stem)
    if path is None:
        raise ApiError(404, f"sample '{name}' has no ground-truth mask", "not_found")
    return FileResponse(path)


def default_samples_dir() -> Path | None:
    """The bundled Kvasir-SEG sample's images, or ``None`` when it cannot be found."""
    try:
        from polypseg.data.sample_data import sample_dataset_path

        return sample_dataset_path() / "images"
    except Exception:  # noqa: BLE001 - samples are a convenience; the API works without them
        return None


def sample_folders(folder: Path | None) -> tuple[Path | None, Path | None]:
    """(images, masks) of a samples folder: a data set folder with ``images/`` (and ``masks/``), or an
    images folder whose sibling ``masks/`` holds the ground truth."""
    if folder is None:
        return None, None
    if (folder / "images").is_dir():
        return folder / "images", folder / "masks"
    return folder, folder.parent / "masks"


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
