"""Export checkpoints for deployment and check them: ONNX verified against PyTorch, optionally int8
with its Dice change measured. What ``polypseg export`` does, for Python callers too.

Above both :mod:`polypseg.inference.export` (writing ONNX) and :mod:`polypseg.inference.predictor` (which loads it),
so neither imports the other's caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def export_checkpoints(
    model: Path,
    *,
    fmt: str = "onnx",
    out: Path | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    int8: bool = False,
    calibration: Path | None = None,
    calibration_count: int = 64,
    validate: Path | None = None,
    validate_limit: int | None = None,
    verify_images: Path | None = None,
    say: Callable[[str], None] = log.info,
    step: Callable[[str], None] = lambda message: None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Export each checkpoint named by ``model`` (one, or every fold of a run); verify against PyTorch.

    With ``int8`` also a static int8 (QDQ) model, and with ``validate`` (a labelled dataset) its
    Dice change against fp32, recorded in its sidecar. ``say`` hears the results, ``step`` what
    starts (for a transient status line). Returns
    one dict per checkpoint (paths, verification differences, Dice change).
    """
    from polypseg.data.sample_data import sample_dataset_path
    from polypseg.inference.export import ExportError, collect_images

    _check_options(fmt=fmt, int8=int8, dynamic_batch=dynamic_batch, calibration=calibration, validate=validate)
    checkpoints = _checkpoints_to_export(model, out)
    source = verify_images or calibration or sample_dataset_path()
    real = _verification_images(collect_images(source), 8, say=say)
    if not real:
        raise ExportError(f"no readable images in {source} to check the export on")
    results = []
    for checkpoint in checkpoints:
        result = _export_verified(
            checkpoint, out, opset=opset, dynamic_batch=dynamic_batch, real=real, say=say, step=step
        )
        if int8:
            onnx_path = Path(result["onnx"])
            int8_path = _quantize(checkpoint, onnx_path, out, calibration, calibration_count, say=say, step=step)
            result["int8"] = str(int8_path)
            if validate is not None:
                change = measure_dice_change(
                    onnx_path,
                    int8_path,
                    validate,
                    limit=validate_limit,
                    progress=progress,
                    exclude=calibration_stems(int8_path),
                )
                result.update(_adopt_if_within_bound(checkpoint, int8_path, change, out, say=say))
            else:
                say(
                    "not validated (no --validate DIR): predict keeps fp32 as the CPU default; pass the .onnx to use int8"
                )
        results.append(result)
    return results


def _check_options(
    *, fmt: str, int8: bool, dynamic_batch: bool, calibration: Path | None, validate: Path | None
) -> None:
    """Refuse option combinations that cannot work, before anything is exported."""
    from polypseg.inference.export import ExportError

    if fmt != "onnx":
        raise ExportError(f"--format {fmt}: only 'onnx' is supported")
    if (calibration is not None or validate is not None) and not int8:
        raise ExportError("--calibration and --validate apply to --int8 only")
    if int8 and not dynamic_batch:
        raise ExportError("--int8 needs the batch axis (calibration runs batches): drop --static-batch")


def _checkpoints_to_export(model: Path, out: Path | None) -> list[Path]:
    """The checkpoints ``model`` names (a shipped model's name works too), checked against ``out``:
    a shipped model's export must go elsewhere, and ``out`` names the file of one checkpoint only."""
    from polypseg.inference.export import ExportError
    from polypseg.models.checkpoint import find_checkpoints
    from polypseg.models.pretrained import WEIGHTS_DIR, resolve_model

    model = resolve_model(model)
    if out is None and Path(model).resolve().parent == WEIGHTS_DIR:
        raise ExportError(f"--out: {Path(model).name} is a shipped model; name where its export goes (--out FILE.onnx)")
    checkpoints = find_checkpoints(model)
    if out is not None and len(checkpoints) > 1:
        raise ExportError(
            f"--out: {model} holds {len(checkpoints)} checkpoints; omit --out to write NAME.onnx beside each"
        )
    return checkpoints


def _verification_images(paths: list[Path], limit: int, *, say: Callable[[str], None]) -> list[np.ndarray]:
    """The first ``limit`` of ``paths`` that decode, decoded once for every checkpoint's check; each one
    that does not is named to ``say`` (one bad file in a calibration folder is left out, as the
    calibration itself leaves it out)."""
    from polypseg.data.images import ImageReadError, read_image

    decoded: list[np.ndarray] = []
    for path in paths:
        if len(decoded) == limit:
            break
        try:
            decoded.append(read_image(path))
        except ImageReadError as error:
            say(f"verification: {error}; left out")
    return decoded


def _export_verified(
    checkpoint: Path,
    out: Path | None,
    *,
    opset: int | None,
    dynamic_batch: bool,
    real: list[np.ndarray],
    say: Callable[[str], None],
    step: Callable[[str], None],
) -> dict[str, Any]:
    """Export one checkpoint to ONNX and compare its probabilities with PyTorch's on random and real images."""
    from polypseg.inference.export import DEFAULT_OPSET, export_onnx, verify_onnx
    from polypseg.inference.loading import resolve_source

    step(f"exporting {checkpoint}")
    threshold = resolve_source(checkpoint).threshold  # predict's rule: a CV fold's is its run's
    onnx_path = export_onnx(
        checkpoint, out, opset=opset or DEFAULT_OPSET, dynamic_batch=dynamic_batch, threshold=threshold
    )
    diff_random = verify_onnx(checkpoint, onnx_path, random_images=4)
    diff_real = verify_onnx(checkpoint, onnx_path, images=real, random_images=0)
    say(
        f"{onnx_path}: max |p_onnx - p_torch| = {diff_random:.2e} on 4 random images, "
        f"{diff_real:.2e} on {len(real)} real images"
    )
    return {
        "checkpoint": str(checkpoint),
        "onnx": str(onnx_path),
        "max_abs_diff_random": diff_random,
        "max_abs_diff_real": diff_real,
    }


def _quantize(
    checkpoint: Path,
    onnx_path: Path,
    out: Path | None,
    calibration: Path | None,
    calibration_count: int,
    *,
    say: Callable[[str], None],
    step: Callable[[str], None],
) -> Path:
    """The static int8 (QDQ) model of ``onnx_path``, calibrated on ``calibration`` (default: the bundled sample)."""
    from polypseg.data.sample_data import sample_dataset_path
    from polypseg.inference.export import int8_path_for, quantize_onnx_int8, read_onnx_metadata

    source = calibration or sample_dataset_path()
    if calibration is None:
        say(f"calibrating on the bundled sample ({source}); pass --calibration DIR with your own images")
    target = int8_path_for(checkpoint) if out is None else out.with_suffix(".int8.onnx")
    step(f"quantizing {onnx_path} to int8")
    int8_path = quantize_onnx_int8(onnx_path, target, source, max_images=calibration_count, warn=say)
    used = read_onnx_metadata(int8_path)["quantization"]["calibration_images"]
    say(f"{int8_path}: int8 (static QDQ, calibrated on {used} images)")
    return int8_path


def _adopt_if_within_bound(
    checkpoint: Path, int8_path: Path, change: dict[str, Any], out: Path | None, *, say: Callable[[str], None]
) -> dict[str, Any]:
    """Record the int8 model's measured Dice change in its sidecar; within the bound it becomes the
    CPU default, and an export written elsewhere (``out``) is copied to where ``backend="auto"``
    looks. Returns the result's ``int8_cached`` (where copied) and ``dice`` entries."""
    from polypseg.core.io_utils import display_name
    from polypseg.inference.export import MAX_INT8_DICE_CHANGE, keep_validated_int8, record_dice_change

    record_dice_change(int8_path, change)
    adopted: dict[str, Any] = {}
    within = abs(change["dice_change"]) <= MAX_INT8_DICE_CHANGE
    if not within:
        verdict = f"beyond {MAX_INT8_DICE_CHANGE}: fp32 stays the CPU default"
    else:
        verdict = f"within {MAX_INT8_DICE_CHANGE}: int8 becomes the CPU default for this checkpoint"
        if out is not None:  # not beside the checkpoint: keep a copy where backend="auto" looks
            try:
                kept = keep_validated_int8(int8_path, checkpoint)
                verdict += f"; a copy kept in {display_name(kept.parent)}"
                adopted["int8_cached"] = str(kept)
            except OSError as error:
                verdict = f"within {MAX_INT8_DICE_CHANGE}, but no copy could be kept in the cache ({error.strerror or error}): pass {int8_path} as --model to use it"
    left_out = (
        f" (not the {change['calibration_excluded']} calibration images there)"
        if change.get("calibration_excluded")
        else ""
    )
    say(
        f"Dice on {change['n']} images{left_out}: fp32 {change['dice_reference']:.4f}, int8 {change['dice_candidate']:.4f}, "
        f"change {change['dice_change']:+.4f} ({verdict})"
    )
    adopted["dice"] = change
    return adopted


def calibration_stems(int8_path: Path) -> set[str]:
    """The stems of the image files ``int8_path`` was calibrated on, as its sidecar names them."""
    from polypseg.inference.export import read_onnx_metadata

    files = (read_onnx_metadata(int8_path).get("quantization") or {}).get("calibration_files") or []
    return {Path(name).stem for name in files}


def measure_dice_change(
    reference: Path | str,
    candidate: Path | str,
    data: Path | str,
    limit: int | None = None,
    progress: bool = True,
    *,
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    """Mean per-image Dice of two models on a labelled dataset, at each image's original size.

    Both use the reference's threshold. Pairs whose image stem is in ``exclude`` (the calibration
    images of an int8 candidate: validating on them would flatter it) are left out before ``limit``
    applies. Returns ``{"n", "data", "dice_reference", "dice_candidate", "dice_change",
    "calibration_excluded", "calibration_overlap"}`` with ``dice_change = candidate - reference``;
    ``calibration_overlap`` (validation images that were calibration images) is 0 by construction.
    """
    import torch

    from polypseg.data.check import usable_index
    from polypseg.data.images import read_mask
    from polypseg.inference.export import ExportError
    from polypseg.inference.predictor import Predictor
    from polypseg.metrics.segmentation import dice_score

    samples = usable_index(data).samples  # the dataset rule of data check, train and cv
    if not samples:
        raise ExportError(f"no image/mask pairs under {data}")
    kept = [sample for sample in samples if Path(sample.image).stem not in exclude]
    if not kept:
        raise ExportError(
            f"--validate {data}: all {len(samples)} image/mask pairs are calibration images; "
            "validate on images the int8 model was not calibrated on"
        )
    excluded, samples = len(samples) - len(kept), kept
    if limit:
        samples = samples[:limit]
    ref = Predictor.from_checkpoint(
        reference, device="cpu", backend="onnxruntime" if str(reference).endswith(".onnx") else "torch"
    )
    cand = Predictor.from_checkpoint(
        candidate, device="cpu", backend="onnxruntime" if str(candidate).endswith(".onnx") else "torch"
    )
    cand.threshold = ref.threshold
    scores: dict[str, list[float]] = {"reference": [], "candidate": []}
    iterator: Any = samples
    if progress:
        from rich.progress import track

        iterator = track(samples, description=f"Dice on {len(samples)} images", transient=True)
    for sample in iterator:
        target = torch.from_numpy(read_mask(sample.mask))
        for key, predictor in (("reference", ref), ("candidate", cand)):
            mask = predictor.predict_one(sample.image).mask
            scores[key].append(float(dice_score(torch.from_numpy(mask), target)[0]))
    reference_dice = float(np.mean(scores["reference"]))
    candidate_dice = float(np.mean(scores["candidate"]))
    return {
        "n": len(samples),
        "data": str(data),
        "dice_reference": reference_dice,
        "dice_candidate": candidate_dice,
        "dice_change": candidate_dice - reference_dice,
        "calibration_excluded": excluded,
        "calibration_overlap": 0,
    }
