"""The studies PolypSeg-GradCAM proposes, each one function behind one command (docs/studies.md).

* :func:`evaluate_external`: a CV run's fold models and their ensemble on another dataset, no retraining
  (defined in :mod:`polypseg.experiments.external`).
* :func:`run_skip_ablation`: U-Net with vs without skip connections on identical folds.
* :func:`run_encoder_init`: ImageNet vs random encoder initialisation on identical folds.
* :func:`run_pranet`: the PraNet protocol (train on Kvasir-SEG minus 100 listed images, test once on them;
  defined in :mod:`polypseg.experiments.pranet`).

This module holds the paired cross-validation studies and names all four, so that
``from polypseg.experiments.studies import ...`` reaches every study. Every study is resumable: its
runs are ordinary ``polypseg cv`` / ``polypseg train`` folders.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from polypseg._version import __version__
from polypseg.core.config import RunConfig
from polypseg.core.io_utils import atomic_write_json, atomic_write_text
from polypseg.core.runs import RunDir
from polypseg.experiments.external import dataset_name, evaluate_external, external_markdown
from polypseg.experiments.pranet import (
    PRANET_LITERATURE,
    evaluate_pranet,
    literature_metrics,
    pranet_markdown,
    run_pranet,
)
from polypseg.experiments.study_common import EXTERNAL_METRICS, StudyError

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11; annotations only

__all__ = [
    "EXTERNAL_METRICS",
    "PRANET_LITERATURE",
    "CVOptions",
    "StudyError",
    "dataset_name",
    "evaluate_external",
    "evaluate_pranet",
    "external_markdown",
    "literature_metrics",
    "pranet_markdown",
    "run_encoder_init",
    "run_paired_study",
    "run_pranet",
    "run_skip_ablation",
    "write_paired_study",
]


def _copy_config(config: RunConfig) -> RunConfig:
    return RunConfig.from_dict(config.to_dict())


def _share_splits(reference: Path, run_dir: Path) -> None:
    """Give ``run_dir`` the reference run's ``splits.json`` before it starts, so the folds are identical."""
    source, target = RunDir(reference), RunDir(run_dir)
    if target.splits_path.is_file():
        if target.read_splits() != source.read_splits():
            raise StudyError(
                f"{target.splits_path} differs from {source.splits_path}: the study's runs must share their folds; use a new --out"
            )
        return
    target.path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.splits_path, target.splits_path)


class CVOptions(TypedDict, total=False):
    """How a paired study cross-validates each arm: keywords of :func:`polypseg.experiments.cv.run_cv`.

    ``folds`` (default 5) and ``seed`` (default 0) fix the first arm's split, which every arm shares;
    ``resume``, ``device``, ``progress``, ``explain`` (Grad-CAM checks per fold), ``cache_dir`` and
    ``report`` mean what they mean for ``run_cv``.
    """

    folds: int
    seed: int
    resume: bool
    device: str
    progress: bool
    explain: bool
    cache_dir: Path | str | None
    report: bool


def run_paired_study(
    data: Path | str, out: Path | str, arms: dict[str, RunConfig], **options: Unpack[CVOptions]
) -> list[Path]:
    """Cross-validate each configuration in ``arms`` into ``OUT/<arm>`` on the first arm's folds."""
    from polypseg.experiments.cv import run_cv

    out = Path(out)
    progress = options.get("progress", True)
    options = {"folds": 5, "seed": 0, **options}
    for config in arms.values():
        _check_arm(config)  # every arm before any trains: a bad later arm would fail hours in
    dirs = [out / name for name in arms]
    for i, (run_dir, config) in enumerate(zip(dirs, arms.values(), strict=False)):
        if i > 0:
            _share_splits(dirs[0], run_dir)
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"[bold]{out.name}[/]: run {i + 1}/{len(dirs)} -> {run_dir}", highlight=False)
        run_cv(data, run_dir, config, **options)
    return dirs


def _check_arm(config: RunConfig) -> None:
    """What ``polypseg cv`` checks before its data is read: the config, the model and its ``--init``."""
    from polypseg.core.config import validate_config
    from polypseg.models.factory import check_model_config
    from polypseg.training.init_source import init_checkpoint

    validate_config(config)
    check_model_config(config.model)
    init_checkpoint(config)


def write_paired_study(
    out: Path, name: str, title: str, intro: list[str], runs: Sequence[Path], metrics: Sequence[str]
) -> dict[str, Any]:
    """Compare the study's runs at 0.5 and at each run's chosen threshold; write ``OUT/<name>.{md,json}``."""
    from polypseg.reporting.compare import compare_runs, test_notes

    fixed = compare_runs(runs, threshold=0.5)
    chosen = compare_runs(runs, threshold="chosen")
    k = len(fixed.reference.folds)
    lines = [f"# {title}", "", *intro, ""]
    lines += [f"## At threshold 0.5 (the same for every run; {k} folds, identical splits)", "", *fixed.table_lines()]
    for metric in metrics:
        lines += ["", *fixed.test_lines(metric, heading="###")]
    lines += [
        "",
        "## At each run's chosen threshold (" + ", ".join(f"{r.name} {r.threshold:g}" for r in chosen.runs) + ")",
        "",
        *chosen.table_lines(),
        "",
        *test_notes(k),
    ]
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    payload = {
        "study": name,
        "polypseg_version": __version__,
        "runs": [str(r) for r in runs],
        "at_0.5": fixed.to_dict(),
        "at_chosen": chosen.to_dict(),
    }
    atomic_write_json(out / f"{name}.json", payload)
    return payload


def run_skip_ablation(
    data: Path | str, out: Path | str, config: RunConfig, **options: Unpack[CVOptions]
) -> dict[str, Any]:
    """U-Net with vs without skip connections, same recipe, seed and folds; writes ``OUT/skip_ablation.{md,json}``."""
    with_skips, no_skips = _copy_config(config), _copy_config(config)
    with_skips.model.skip_connections, no_skips.model.skip_connections = True, False
    if with_skips.model.arch != "unet":
        raise StudyError(f"the skip ablation is defined for arch 'unet', not '{with_skips.model.arch}'")
    runs = run_paired_study(data, out, {"with-skips": with_skips, "no-skips": no_skips}, **options)
    intro = [
        f"U-Net / {config.model.encoder} (encoder init `{config.model.encoder_weights}`), recipe `{config.train.recipe}`, "
        f"with and without its skip connections, trained on identical folds with the same seed.",
        "The no-skip decoder keeps the same blocks and widths but sees only the upsampled bottleneck path, so all spatial "
        "detail must pass through the 1/32-resolution features: boundary F1 measures the expected loss of contour quality.",
        f"Runs: `{runs[0]}`, `{runs[1]}`.",
    ]
    return write_paired_study(
        Path(out), "skip_ablation", "Skip-connection ablation", intro, runs, ("dice", "iou", "boundary_f1")
    )


def run_encoder_init(
    data: Path | str,
    out: Path | str,
    config: RunConfig,
    *,
    imagenet_weights: str = "imagenet",
    **options: Unpack[CVOptions],
) -> dict[str, Any]:
    """ImageNet vs random encoder initialisation on identical folds; writes ``OUT/encoder_init.{md,json}``.

    Stops before any training, with a one-line :class:`~polypseg.models.factory.EncoderWeightsError`, when
    the ImageNet weights cannot be had (offline without a cache, or a bad ``imagenet_weights`` file).
    """
    from polypseg.models.factory import EncoderWeightsError, create_model

    out = Path(out)
    pretrained, scratch = _copy_config(config), _copy_config(config)
    saved = RunDir(out / "imagenet").saved_settings()
    weights = saved.config.model.encoder_weights if saved is not None else imagenet_weights
    pretrained.model.encoder_weights = weights
    scratch.model.encoder_weights = "none"
    try:
        create_model(pretrained.model)  # fail fast: before caching data or training the other arm
    except EncoderWeightsError as error:
        raise EncoderWeightsError(
            f"encoder-init study stopped before training (nothing was run): {error} For this study, give the "
            "ImageNet arm's weights with --encoder-weights PATH; the random arm needs none."
        ) from None
    runs = run_paired_study(data, out, {"imagenet": pretrained, "random": scratch}, **options)
    intro = [
        f"U-Net / {config.model.encoder}, recipe `{config.train.recipe}`, encoder initialised from ImageNet weights "
        f"(`{weights}`) vs randomly, trained on identical folds with the same seed. The paper uses ImageNet weights.",
        f"Runs: `{runs[0]}`, `{runs[1]}`.",
    ]
    return write_paired_study(
        out, "encoder_init", "Encoder initialisation: ImageNet vs random", intro, runs, ("dice", "iou", "boundary_f1")
    )
