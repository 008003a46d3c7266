"""Example cases for the report: pick best / median / worst out-of-fold images, recompute their Grad-CAM."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from polypseg.core.runs import RunDir
from polypseg.data.cache import build_cache
from polypseg.data.images import DataError, read_image, resize_image
from polypseg.data.pairing import index_dataset
from polypseg.explain.gallery import select_cases
from polypseg.models.checkpoint import CheckpointError, load_checkpoint

__all__ = ["Case", "add_heatmaps", "load_case_images", "select_cases"]


@dataclass
class Case:
    """One out-of-fold image at model resolution: what the report shows about it."""

    stem: str
    fold: int
    dice: float
    boundary_f1: float
    mask: np.ndarray  # bool (S, S)
    prob: np.ndarray  # float32 (S, S)
    threshold: float
    image: np.ndarray | None = None  # uint8 (S, S, 3)
    heatmap: np.ndarray | None = None  # float32 (S, S) in [0, 1]
    energy_inside: float = float("nan")

    @property
    def pred(self) -> np.ndarray:
        return self.prob >= self.threshold


def _like_training_cache(image: np.ndarray, size: int) -> np.ndarray:
    """Resize and JPEG(95) round-trip exactly as :func:`polypseg.data.cache.build_cache` does, so the
    heatmap is computed on the same pixels the out-of-fold prediction was made from."""
    buffer = io.BytesIO()
    Image.fromarray(resize_image(image, size)).save(buffer, format="JPEG", quality=95)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def load_case_images(data_root: Path | str, stems: Sequence[str], size: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Images for ``stems`` at model resolution, read from the dataset folder (or the run's cache file);
    also the problems met.

    From a folder, only the few files shown are decoded (not the whole dataset); a missing folder or
    an unreadable file is reported, never raised.
    """
    problems: list[str] = []
    if Path(data_root).suffix == ".npz":  # the run was trained from a cache file: read the same pixels back
        try:
            cache = build_cache(data_root, size, progress=False)
        except (DataError, OSError, ValueError) as error:
            return {}, [f"data cache unavailable ({error}); cases are shown without image and heatmap"]
        position = {s: i for i, s in enumerate(cache.stems)}
        problems = [f"{stem}: not found in {data_root}" for stem in stems if stem not in position]
        return {s: cache.images[position[s]] for s in stems if s in position}, problems
    try:
        index = index_dataset(data_root)
    except DataError as error:
        return {}, [f"dataset folder unavailable ({error}); cases are shown without image and heatmap"]
    by_stem = {s.stem: s for s in index.samples}
    images: dict[str, np.ndarray] = {}
    for stem in stems:
        sample = by_stem.get(stem)
        if sample is None:
            problems.append(f"{stem}: not found in {data_root}")
            continue
        try:
            images[stem] = _like_training_cache(read_image(sample.image), size)
        except DataError as error:
            problems.append(str(error))
    return images, problems


def add_heatmaps(run_dir: Path, cases: Sequence[Case], device: str | torch.device = "cpu") -> list[str]:
    """Grad-CAM (the paper's: final decoder block, masked-logit-sum target) for every case with an image,
    each with the model of the fold that held it out. Returns the problems met."""
    from polypseg.explain.gradcam import GradCAMDriver, MaskedLogitSum
    from polypseg.explain.metrics import energy_inside

    device = torch.device(device)
    problems: list[str] = []
    by_fold: dict[int, list[Case]] = defaultdict(list)
    for case in cases:
        if case.image is not None:
            by_fold[case.fold].append(case)
    for fold, fold_cases in sorted(by_fold.items()):
        try:
            checkpoint = load_checkpoint(RunDir(run_dir).best_checkpoint(fold), device=device)
        except CheckpointError as error:
            problems.append(f"fold {fold}: {error}; its cases are shown without heatmap")
            continue
        threshold = fold_cases[0].threshold
        with GradCAMDriver(checkpoint.model, device=device, batch_size=len(fold_cases)) as driver:
            heatmaps = driver.run(np.stack([c.image for c in fold_cases]), MaskedLogitSum(threshold)).heatmaps
        for case, heatmap in zip(fold_cases, heatmaps.float().cpu().numpy(), strict=False):
            case.heatmap = heatmap
            case.energy_inside = float(energy_inside(heatmap, case.mask))
    return problems
