"""The layout of a run folder, in one place: its file names, fold folders and typed ``config.json``.

Every module that reads or writes a run goes through :class:`RunDir`. A cross-validation run
(``polypseg cv``)::

    RUN/config.json           RunSettings, kind "cv": {"run": RunConfig, "data", "folds", "seed", "polypseg_version"}
    RUN/splits.json           the seeded K-fold split, written once
    RUN/invocations.json      each invocation: start, wall and paused time, machine, precision, version, commit
    RUN/fold_N/               one training folder per fold (N = 0 .. K-1):
        best.{safetensors,json}, history.json, last_state.*   (polypseg.training.loop)
        oof.npz, metrics.json                                   (the held-out fold, once evaluated)
    RUN/summary.{json,md}, RUN/pooled_histograms.npz            (polypseg.experiments.cv, from the finished folds)
    RUN/external_<dataset>.{json,md}                           (polypseg evaluate, by default)
    RUN/report.html, RUN/figures/                               (the report, a view of the above)

A single-split training folder (``polypseg train``)::

    OUT/config.json           RunSettings, kind "train": a bare RunConfig
    OUT/split.json            {"data", "train", "val", "test"}, written once
    OUT/best.*, OUT/history.json, OUT/last_state.*, OUT/test_metrics.json

This module stays light (no torch at import): the CLI reads run folders before it needs a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from polypseg.core.config import RunConfig
from polypseg.core.io_utils import atomic_write, atomic_write_json, atomic_write_text, read_json
from polypseg.errors import PolypsegError

if TYPE_CHECKING:
    import numpy as np
    import torch

CONFIG = "config.json"
SPLITS = "splits.json"
SPLIT = "split.json"
INVOCATIONS = "invocations.json"
SUMMARY = "summary.json"
SUMMARY_MD = "summary.md"
POOLED_HISTOGRAMS = "pooled_histograms.npz"
REPORT = "report.html"
FIGURES = "figures"
TEST_METRICS = "test_metrics.json"
EXTERNAL_PREFIX = "external_"  # external_<dataset>.{json,md}: polypseg evaluate's results
# The files of one training folder (a fold, or a single-split run); checkpoints are stems.
BEST = "best"
LAST_STATE = "last_state"
HISTORY = "history.json"
OOF = "oof.npz"
FOLD_METRICS = "metrics.json"

FOLD_PREFIX = "fold_"
# What a run's record (RunDir.record_files) keeps: text only. Weights, training state, predictions
# (npz), the report and its figures can be regenerated or are too large for a repository.
RECORD_SUFFIXES = (".json", ".md", ".txt", ".csv")
RunKind = Literal["cv", "train"]
CV: RunKind = "cv"
TRAIN: RunKind = "train"


class RunError(PolypsegError):
    """A run folder is missing, unreadable, or does not match the requested data or configuration."""


def fold_name(index: int) -> str:
    """The folder name of fold ``index``: ``fold_3``."""
    return f"{FOLD_PREFIX}{int(index)}"


def parse_fold_name(name: str) -> int | None:
    """The index of a fold folder's name (``fold_3`` -> 3); ``None`` for any other name."""
    digits = name[len(FOLD_PREFIX) :] if name.startswith(FOLD_PREFIX) else ""
    return int(digits) if digits.isascii() and digits.isdigit() else None


def refuse_changed_settings(run_dir: Path | str, changed: Sequence[str]) -> None:
    """Stop a resume that would continue a run under other settings (``changed``: ``field: saved -> given``)."""
    if changed:
        raise RunError(
            f"{run_dir} holds a run with other settings ({'; '.join(changed)}); "
            "resume it without recipe options, or choose a new --out"
        )


@dataclass
class RunSettings:
    """A run's ``config.json``, typed.

    ``kind`` is ``"cv"`` (saved as ``{"run": <RunConfig>, "data", "folds", "seed",
    "polypseg_version"}``) or ``"train"`` (saved as a bare RunConfig, ``data`` then lives in
    ``split.json``). Loading tells the two apart by their shape, so every folder written so far
    loads, and saving writes each kind exactly as before.
    """

    config: RunConfig
    kind: RunKind = CV
    data: str | None = None
    folds: int | None = None
    seed: int | None = None
    polypseg_version: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> RunSettings:
        """Settings from ``config.json``'s content (either kind; old configs are migrated by :meth:`RunConfig.from_dict`)."""
        if not isinstance(data, Mapping):
            raise RunError(f"a run's config.json holds a JSON object, not {type(data).__name__}")
        if "run" in data:
            folds, seed = data.get("folds"), data.get("seed")
            return cls(
                config=RunConfig.from_dict(data["run"]),
                kind=CV,
                data=None if data.get("data") is None else str(data["data"]),
                folds=None if folds is None else int(folds),
                seed=None if seed is None else int(seed),
                polypseg_version=data.get("polypseg_version"),
            )
        if "model" in data or "train" in data:
            return cls(config=RunConfig.from_dict(data), kind=TRAIN)
        raise RunError("a run's config.json holds neither a CV run ('run') nor a training config ('model', 'train')")

    def to_dict(self) -> dict[str, Any]:
        """``config.json``'s content, in the shape of this kind."""
        if self.kind == TRAIN:
            return self.config.to_dict()
        if self.kind != CV:
            raise ValueError(f"unknown run kind {self.kind!r}")
        saved: dict[str, Any] = {
            "run": self.config.to_dict(),
            "data": self.data,
            "folds": self.folds,
            "seed": self.seed,
        }
        if self.polypseg_version is not None:
            saved["polypseg_version"] = self.polypseg_version
        return saved


class OutOfFold(NamedTuple):
    """Out-of-fold predictions: ``stems``, ``probs`` (N,S,S float), ``masks`` (N,S,S), the ``folds`` of each image."""

    stems: list[str]
    probs: torch.Tensor
    masks: torch.Tensor
    folds: list[int]


class RunDir(os.PathLike):
    """A run folder (CV run or single-split training folder): the one owner of its layout.

    Paths are plain properties and methods; ``read_*`` return ``None`` where a file is absent and
    raise :class:`RunError` where one is unreadable; ``write_*`` write atomically.
    """

    def __init__(self, path: Path | str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # -- files of the run ----------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def splits_path(self) -> Path:
        """The K-fold split of a CV run."""
        return self.path / SPLITS

    @property
    def split_path(self) -> Path:
        """The train/val/test split of a single-split training folder."""
        return self.path / SPLIT

    @property
    def invocations_path(self) -> Path:
        return self.path / INVOCATIONS

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def summary_md_path(self) -> Path:
        return self.path / SUMMARY_MD

    @property
    def pooled_histograms_path(self) -> Path:
        return self.path / POOLED_HISTOGRAMS

    @property
    def report_path(self) -> Path:
        return self.path / REPORT

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES

    @property
    def test_metrics_path(self) -> Path:
        return self.path / TEST_METRICS

    def external_results(self) -> list[Path]:
        """The external-validation results saved in the run (``external_<dataset>.json``), by name."""
        return sorted(self.path.glob(f"{EXTERNAL_PREFIX}*.json"))

    def record_files(self) -> list[Path]:
        """The run's small text files, to commit or publish as its record (e.g. under docs/runs/).

        Config, split(s), invocations, summaries, test and external metrics, and per training
        folder its history, metrics and checkpoint sidecar; never weights, training state,
        predictions or the report. Unfinished folds contribute what they have so far.
        """
        folders = [self.path, *(self.fold_dir(i) for i in self.fold_indices())]
        return [
            file
            for folder in folders
            for file in sorted(folder.iterdir())
            if file.is_file() and file.suffix in RECORD_SUFFIXES and not file.name.startswith(LAST_STATE)
        ]

    def copy_record(self, dest: Path | str) -> list[Path]:
        """Copy :meth:`record_files` to ``dest``, keeping fold folders; returns the copies."""
        import shutil

        copies = []
        for file in self.record_files():
            target = Path(dest) / file.relative_to(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
            copies.append(target)
        return copies

    # -- folds ---------------------------------------------------------------------------------

    def fold_dir(self, index: int) -> Path:
        return self.path / fold_name(index)

    def training_dir(self, fold: int | None = None) -> Path:
        """Where a model is trained: fold ``fold``'s folder, or (``None``) the run folder itself."""
        return self.path if fold is None else self.fold_dir(fold)

    def best_checkpoint(self, fold: int | None = None) -> Path:
        """The stem of the best checkpoint (``best``) of a fold, or of a single-split run."""
        return self.training_dir(fold) / BEST

    def history_path(self, fold: int | None = None) -> Path:
        return self.training_dir(fold) / HISTORY

    def training_state(self, fold: int | None = None) -> Path:
        """The stem of the training state (``last_state``: optimizer, EMA, history) of an unfinished run."""
        return self.training_dir(fold) / LAST_STATE

    def oof_path(self, fold: int) -> Path:
        return self.fold_dir(fold) / OOF

    def fold_metrics_path(self, fold: int) -> Path:
        return self.fold_dir(fold) / FOLD_METRICS

    def fold_indices(self) -> list[int]:
        """The folds that have a folder (started or finished), in order."""
        if not self.path.is_dir():
            return []
        found = (parse_fold_name(p.name) for p in self.path.iterdir() if p.is_dir())
        return sorted(i for i in found if i is not None)

    def finished_folds(self) -> list[int]:
        """The folds evaluated on their held-out images (``fold_N/oof.npz`` exists), in order."""
        return [i for i in self.fold_indices() if self.oof_path(i).is_file()]

    def fold_checkpoints(self) -> list[Path]:
        """Each fold's best checkpoint weights (``fold_N/best.safetensors``) that exist, in fold order.

        A fold still training (its ``history.json`` shorter than the config's epochs) is left out:
        its best checkpoint is not yet its final one. Folds without a history (a run copied for
        deployment, or fold checkpoints put together by hand) count as they are.
        """
        folds = [i for i in self.fold_indices() if not self.fold_still_training(i)]
        paths = (self.best_checkpoint(i).with_suffix(".safetensors") for i in folds)
        return [p for p in paths if p.is_file()]

    def fold_still_training(self, fold: int) -> bool:
        """True while fold ``fold``'s history holds fewer epochs than the run's config asks for."""
        if not self.has_settings():
            return False
        try:
            epochs = self.read_settings().config.train.epochs
            history = self.read_history(fold)
        except RunError:
            return False
        return history is not None and len(history) < epochs

    # -- config.json ---------------------------------------------------------------------------

    def has_settings(self) -> bool:
        """True once a run was started here (``config.json`` exists)."""
        return self.config_path.is_file()

    def read_settings(self) -> RunSettings:
        """The run's typed ``config.json`` (either kind); :class:`RunError` if there is none."""
        if not self.config_path.is_file():
            raise RunError(f"{self.path} is not a polypseg run folder (no {CONFIG})")
        data = self._read(self.config_path)
        try:
            return RunSettings.from_dict(data)
        except RunError as error:
            raise RunError(f"{self.config_path}: {error}") from None

    def saved_settings(self) -> RunSettings | None:
        """:meth:`read_settings`, or ``None`` where no run was started yet."""
        return self.read_settings() if self.has_settings() else None

    def write_settings(self, settings: RunSettings) -> None:
        if settings.kind == TRAIN:
            settings.config.save(self.config_path)  # byte for byte as RunConfig.save always wrote it
        else:
            atomic_write_json(self.config_path, settings.to_dict())

    # -- splits --------------------------------------------------------------------------------

    def read_splits(self) -> dict[str, Any] | None:
        """A CV run's ``splits.json`` (``seed``, ``k``, ``val_fraction``, ``stems``, ``folds``), or ``None``."""
        return self._read(self.splits_path) if self.splits_path.is_file() else None

    def write_splits(self, splits: Mapping[str, Any]) -> None:
        atomic_write_json(self.splits_path, dict(splits))

    def read_split(self) -> dict[str, Any] | None:
        """A training folder's ``split.json`` (``data``, ``train``, ``val``, ``test`` stems), or ``None``."""
        return self._read(self.split_path) if self.split_path.is_file() else None

    def write_split(self, split: Mapping[str, Any]) -> None:
        atomic_write_json(self.split_path, dict(split))

    # -- results -------------------------------------------------------------------------------

    def read_summary(self) -> dict[str, Any] | None:
        return self._read(self.summary_path) if self.summary_path.is_file() else None

    def write_summary(self, summary: Mapping[str, Any], markdown: str) -> None:
        """``summary.json`` and its readable ``summary.md``."""
        atomic_write_json(self.summary_path, dict(summary))
        atomic_write_text(self.summary_md_path, markdown)

    def read_pooled_histograms(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The pooled ``(positive, negative)`` probability histograms, or ``None``."""
        import numpy as np

        if not self.pooled_histograms_path.is_file():
            return None
        with np.load(self.pooled_histograms_path, allow_pickle=False) as data:
            return data["positive"], data["negative"]

    def write_pooled_histograms(self, positive: np.ndarray, negative: np.ndarray) -> None:
        _write_npz(self.pooled_histograms_path, {"positive": positive, "negative": negative})

    def read_fold_metrics(self, fold: int) -> dict[str, Any] | None:
        path = self.fold_metrics_path(fold)
        return self._read(path) if path.is_file() else None

    def read_history(self, fold: int | None = None) -> list[dict[str, Any]] | None:
        path = self.history_path(fold)
        return self._read(path) if path.is_file() else None

    def histories(self) -> dict[int, list[dict[str, Any]]]:
        """Each fold's training history that exists and is not empty."""
        found = {i: self.read_history(i) for i in self.fold_indices()}
        return {i: history for i, history in found.items() if history}

    def write_oof(self, fold: int, stems: Sequence[str], probs: np.ndarray, masks: np.ndarray) -> None:
        """Fold ``fold``'s held-out predictions: ``probs`` quantised to ``uint8`` (see polypseg.training.evaluation)."""
        import numpy as np

        _write_npz(self.oof_path(fold), {"stems": np.array(list(stems)), "probs": probs, "masks": masks})

    def load_fold_oof(self, fold: int) -> OutOfFold:
        """One fold's held-out predictions (probabilities dequantised to float)."""
        import numpy as np
        import torch

        path = self.oof_path(fold)
        if not path.is_file():
            raise RunError(f"{path} is missing: fold {fold} of {self.path} is not finished")
        with np.load(path, allow_pickle=False) as data:
            stems = [str(s) for s in data["stems"]]
            return OutOfFold(
                stems, dequantize_probabilities(data["probs"]), torch.from_numpy(data["masks"]), [fold] * len(stems)
            )

    def load_oof(self, folds: Sequence[int] | None = None) -> OutOfFold:
        """Out-of-fold predictions of ``folds`` (default: every finished fold), pooled in fold order."""
        import torch

        chosen = self.finished_folds() if folds is None else list(folds)
        if not chosen:
            raise RunError(f"{self.path} has no out-of-fold predictions ({FOLD_PREFIX}*/{OOF})")
        parts = [self.load_fold_oof(fold) for fold in chosen]
        return OutOfFold(
            [s for p in parts for s in p.stems],
            torch.cat([p.probs for p in parts]),
            torch.cat([p.masks for p in parts]),
            [f for p in parts for f in p.folds],
        )

    def _read(self, path: Path) -> Any:
        try:
            return read_json(path)
        except (ValueError, UnicodeDecodeError) as error:
            raise RunError(f"{path} is not valid JSON ({error})") from None
        except OSError as error:
            raise RunError(f"cannot read {path}: {error.strerror or error}") from None


def _write_npz(path: Path, arrays: Mapping[str, Any]) -> None:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(path, write)


def quantize_probabilities(probs: torch.Tensor) -> np.ndarray:
    """``float [0, 1]`` -> ``uint8`` (round(p * 255)): how out-of-fold files store probabilities,
    4x smaller, error <= 0.002."""
    import torch

    return (probs.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def dequantize_probabilities(probs: np.ndarray) -> torch.Tensor:
    """The stored ``uint8`` probabilities back to ``float32`` in [0, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(probs.astype(np.float32) / 255.0)
