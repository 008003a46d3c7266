"""Predict image and video files into a folder: masks, overlays, probabilities, predictions.csv, videos.csv.

What ``polypseg predict`` does, for Python callers too: :func:`predict_files`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polypseg.core.rules import check_threshold
from polypseg.data.inputs import InputFile
from polypseg.errors import PolypsegError

log = logging.getLogger(__name__)

# Decoded pixels a batch of images may hold before it is sent (8 Full-HD frames: about 50 MB).
BATCH_PIXELS = 8 * 1920 * 1080
# "mask": the mask written for "file" (names are made distinct: x.png and x.jpg give masks/x.png and masks/x-2.png)
PREDICTION_COLUMNS = (
    "file",
    "width",
    "height",
    "area_pixels",
    "area_fraction",
    "mean_confidence",
    "threshold",
    "mask",
)
VIDEO_COLUMNS = (
    "file",
    "frames",
    "fps",
    "seconds",
    "consistency",
    "consistency_smoothed",
    "alpha",
    "overlay",
    "frames_csv",
    "warning",
)


@dataclass(frozen=True)
class PredictSummary:
    """What :func:`predict_files` did: inputs predicted and skipped, and the closing line it said."""

    images: int  # images predicted
    videos: int  # videos predicted
    skipped: int  # inputs named in skipped.csv
    closing: str

    @property
    def done(self) -> int:
        """Inputs predicted (images and videos): 0 means none could be."""
        return self.images + self.videos

    def to_json(self) -> dict[str, Any]:
        """The counts and the closing line, with ``done``, as JSON-ready values."""
        return {
            "images": self.images,
            "videos": self.videos,
            "skipped": self.skipped,
            "done": self.done,
            "closing": self.closing,
        }


def predict_files(
    inputs: Sequence[Path],
    out: Path,
    *,
    model: Path | str | None = None,
    threshold: float | None = None,
    tta: bool = False,
    backend: str = "auto",
    device: str = "auto",
    batch_size: int = 8,
    smooth: float | None = None,
    save_probabilities: bool = False,
    recursive: bool = False,
    fold: int | None = None,
    overlays: bool = True,
    cache_dir: Path | None = None,
    precision: str = "auto",
    warn: Callable[[str], None] = log.warning,
    say: Callable[[str], None] = log.info,
    progress: bool = True,
) -> PredictSummary:
    """Predict images and videos into ``out``; returns counts of done and skipped inputs.

    Inputs are collected by :func:`polypseg.data.inputs.collect_inputs` (images and videos; folders
    recursively with ``recursive``). Bad inputs follow :mod:`polypseg.data.inputs`: each is skipped
    and named with its cause through ``warn``, the rest are predicted, and the closing line
    (:attr:`PredictSummary.closing`, also given to ``say``) counts both. Options are checked first,
    each error naming its command-line option.
    """
    from polypseg.data.inputs import SkipLog, collect_inputs, one_line_warnings, prepare_output_folder, write_csv_if_any
    from polypseg.inference.predictor import Predictor

    _check_options(out, model, threshold, batch_size, smooth, fold, precision)
    skips = SkipLog(warn)
    with one_line_warnings(warn):
        items = collect_inputs(inputs, skips, videos=True, recursive=recursive, exclude=out)
        if not items:
            raise PolypsegError("no images or videos to predict (see the warnings above)")

        predictor = Predictor.from_checkpoint(
            model,
            device=device,
            backend=backend,
            tta=tta,
            threshold=threshold,
            fold=fold,
            batch_size=batch_size,
            cache_dir=cache_dir,
            notify=say,
            precision=precision,
        )
        say(f"model: {predictor!r}")
        for note in _unused_option_notes(
            predictor, items, tta=tta, smooth=smooth, save_probabilities=save_probabilities
        ):
            say(note)
        prepare_output_folder(out)

        images = [item for item in items if not item.video]
        rows = _predict_images(predictor, images, out, overlays, save_probabilities, skips, progress)
        # Each table is this run's: one an earlier run left in --out and this run has no rows for goes.
        columns = list(PREDICTION_COLUMNS) + (["uncertainty_mean"] if predictor.n_models > 1 else [])
        write_csv_if_any(out / "predictions.csv", columns, rows)

        videos = [item for item in items if item.video]
        video_rows = _predict_videos(predictor, videos, out, smooth, overlays, skips, warn, say, progress)
        write_csv_if_any(
            out / "videos.csv", VIDEO_COLUMNS, [{k: _text(v) for k, v in row.items()} for row in video_rows]
        )
        skips.write_csv(out / "skipped.csv")
    closing = skips.closing(f"{len(rows)} image(s), {len(video_rows)} video(s) predicted", out)
    say(closing)
    return PredictSummary(images=len(rows), videos=len(video_rows), skipped=len(skips), closing=closing)


def _unused_option_notes(
    predictor: Any, items: Sequence[InputFile], *, tta: bool, smooth: float | None, save_probabilities: bool
) -> list[str]:
    """One note per option given that these inputs do not use, and one for a flip-TTA model run without it."""
    from polypseg.inference.loading import flip_tta_note

    videos = sum(1 for item in items if item.video)
    notes = []
    if smooth is not None and not videos:
        notes.append("note: --smooth applies to videos only, and there is no video among the inputs: not used")
    if save_probabilities and videos:
        notes.append(
            f"note: --save-probabilities applies to images only: the {videos} video(s) get no probability maps"
        )
    tta_note = flip_tta_note(predictor.metadata.get("config") or {}, "predict", tta)
    return notes + ([tta_note] if tta_note else [])


def _predict_videos(
    predictor: Any,
    videos: list[InputFile],
    out: Path,
    smooth: float | None,
    overlays: bool,
    skips: Any,
    warn: Callable[[str], None],
    say: Callable[[str], None],
    progress: bool,
) -> list[dict[str, Any]]:
    """Segment each video into ``out`` (one line each through ``say``); unreadable ones go to ``skips``."""
    from polypseg.data.inputs import FAILED
    from polypseg.inference.video import VideoError, segment_video

    video_rows: list[dict[str, Any]] = []
    for item in videos:
        try:
            result = segment_video(
                predictor, item.path, out, alpha=smooth, stem=item.name, write_overlay=overlays, progress=progress
            )
        except VideoError as error:
            skips.skip(item.path, str(error), cause=FAILED)
            continue
        if result.warning:
            warn(result.warning)
        speed = result.frames / max(result.seconds, 1e-9)
        line = (
            f"{item.path}: {result.frames} frames in {result.seconds:.1f} s ({speed:.1f} frames/s), "
            f"consistency (mean IoU of consecutive masks) {result.consistency:.4f}"
        )
        if result.consistency_smoothed is not None:
            line += f" raw, {result.consistency_smoothed:.4f} with EMA smoothing (alpha {result.alpha:g})"
        say(line)
        video_rows.append(
            {
                "file": str(item.path),
                "frames": result.frames,
                "fps": round(result.fps, 3),
                "seconds": round(result.seconds, 3),
                "consistency": round(result.consistency, 6),
                "consistency_smoothed": ""
                if result.consistency_smoothed is None
                else round(result.consistency_smoothed, 6),
                "alpha": "" if result.alpha is None else result.alpha,
                "overlay": result.overlay.name if result.overlay else "",
                "frames_csv": result.frames_csv.name if result.frames_csv else "",
                "warning": result.warning or "",
            }
        )
    return video_rows


def _check_options(
    out: Path,
    model: Path | str | None,
    threshold: float | None,
    batch_size: int,
    smooth: float | None,
    fold: int | None,
    precision: str,
) -> None:
    """One line naming the first bad option, before any work."""
    from polypseg.core.precision import check_precision
    from polypseg.data.inputs import prepare_output_folder

    if batch_size < 1:
        raise PolypsegError(f"--batch-size {batch_size}: must be >= 1")
    if smooth is not None and not 0 < smooth <= 1:
        raise PolypsegError(f"--smooth {smooth}: the EMA weight of the newest frame must be in (0, 1]")
    if threshold is not None:
        check_threshold(threshold, "--threshold")  # the rule of explain, serve and checkpoint sidecars
    if out.exists() and not out.is_dir():
        prepare_output_folder(out)  # one line naming --out
    check_precision(precision, "--precision")
    if fold is not None:
        _check_fold(model, fold)


def _check_fold(model: Path | str | None, fold: int) -> None:
    """``--fold`` picks a fold of a CV run folder: one line, as in explain, when ``model`` has no such fold
    (a single checkpoint, a shipped model); an ONNX model is left to the predictor, which names it."""
    from polypseg.models.checkpoint import pick_checkpoint
    from polypseg.models.pretrained import resolve_model

    path = resolve_model(model)
    if path.suffix != ".onnx":
        pick_checkpoint(path, fold)


def _text(value: Any) -> Any:
    from polypseg.core.io_utils import display_name

    return display_name(value) if isinstance(value, str) else value


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    from polypseg.core.io_utils import atomic_write

    def write(tmp: Path) -> None:
        Image.fromarray(array).save(tmp, format="PNG")

    atomic_write(path, write)


def _load_image(item: InputFile) -> np.ndarray:
    """Decode one input after checking its header against :data:`polypseg.data.inputs.MAX_INPUT_PIXELS`."""
    from polypseg.core.io_utils import display_name
    from polypseg.data.images import ImageReadError, read_image
    from polypseg.data.inputs import UNREADABLE, InputProblem, check_pixels

    check_pixels(item.path)
    try:
        return read_image(item.path)
    except ImageReadError as error:
        raise InputProblem(UNREADABLE, display_name(str(error))) from None
    except MemoryError:
        raise InputProblem(UNREADABLE, f"{display_name(item.path)}: not enough memory to decode it") from None


def _predict_images(
    predictor: Any,
    images: list[InputFile],
    out: Path,
    overlays: bool,
    save_probabilities: bool,
    skipped: Any,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write masks (and overlays, probabilities) of ``images``; unreadable ones go to ``skipped``.

    The model runs at its own resolution on batches of ``predictor.batch_size`` images (fewer when
    they hold over ``BATCH_PIXELS`` pixels); each map is brought to the image's size in stripes
    (:func:`polypseg.inference.masks.upsample_rows`) only to be written, and the overlay is drawn into the
    decoded image itself, so the peak memory per image stays near 8 bytes per pixel.
    """
    from rich.console import Console
    from rich.progress import track

    from polypseg.core.io_utils import display_name
    from polypseg.data.inputs import InputProblem
    from polypseg.inference.masks import overlay_mask_inplace, upsample_mask, upsample_uint8

    rows: list[dict[str, Any]] = []
    shown = (
        track(images, description=f"predicting {len(images)} image(s)", transient=True, console=Console(stderr=True))
        if progress
        else images
    )
    batch: list[tuple[InputFile, np.ndarray]] = []

    def write(item: InputFile, image: np.ndarray, mean: np.ndarray, std: np.ndarray | None) -> None:
        shape = image.shape[:2]
        mask, confidence = upsample_mask(mean, shape, predictor.threshold)
        area = int(np.count_nonzero(mask))
        _save_png(out / "masks" / f"{item.name}.png", _mask_png(mask))
        if save_probabilities:
            _save_png(out / "probabilities" / f"{item.name}.png", upsample_uint8(mean, shape))
        row = {
            "file": display_name(item.path),
            "width": shape[1],
            "height": shape[0],
            "area_pixels": area,
            "area_fraction": round(area / max(mask.size, 1), 6),
            "mean_confidence": round(confidence, 6),
            "threshold": predictor.threshold,
            "mask": f"masks/{item.name}.png",
        }
        if std is not None:
            # a std of probabilities is at most 0.5: stored as round(std * 510) to use all 8 bits
            uncertainty = upsample_uint8(std, shape, scale=510.0)
            row["uncertainty_mean"] = round(float(uncertainty.mean(dtype=np.float64)) / 510.0, 6)
            if save_probabilities:
                _save_png(out / "uncertainty" / f"{item.name}.png", uncertainty)
            del uncertainty
        if overlays:
            if not image.flags.writeable:  # decoded arrays can be read-only views of PIL's buffer
                image = np.array(image)
            _save_png(out / "overlays" / f"{item.name}.png", overlay_mask_inplace(image, mask))
        rows.append(row)

    def flush() -> None:
        if batch:
            mean, std = predictor.predict_model_size([image for _, image in batch])
            for i, (item, image) in enumerate(batch):
                write(item, image, mean[i], None if std is None else std[i])
            batch.clear()

    for item in shown:
        try:
            image = _load_image(item)
        except InputProblem as problem:
            skipped.skip(item.path, problem)
            continue
        batch.append((item, image))
        # --batch-size images per forward pass, but never more than BATCH_PIXELS decoded pixels held
        if len(batch) >= predictor.batch_size or sum(im.shape[0] * im.shape[1] for _, im in batch) >= BATCH_PIXELS:
            flush()
    flush()
    return rows


def _mask_png(mask: np.ndarray) -> np.ndarray:
    out = mask.view(np.uint8)
    return out * np.uint8(255)
