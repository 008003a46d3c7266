"""What :meth:`polypseg.inference.predictor.Predictor.from_checkpoint` decides before any engine loads a model.

Two steps, both free of engines and devices, so each can be tested as a table:

- :func:`resolve_source`: a shipped model's name, a checkpoint, a CV run folder or an exported ``.onnx``
  file -> a :class:`ModelSource` (its checkpoints, image size, threshold and the metadata a predictor reports;
  an exported model's come from its sidecar, :func:`read_onnx_sidecars`);
- :func:`choose_engine`: the backend asked for, the device, the options and the installed engines -> the
  engine to load it with (:class:`EngineChoice`), or the one-line refusal of a combination that cannot run.

The engines themselves are registered in :data:`polypseg.inference.predictor.ENGINES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from polypseg.core.rules import image_size_problem, threshold_problem
from polypseg.core.runs import RunDir, fold_name, parse_fold_name
from polypseg.errors import PolypsegError

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")


class PredictorError(PolypsegError):
    """A model cannot be loaded for inference, or an option does not fit it."""


# --------------------------------------------------------------------------------------------
# Backend choice


@dataclass(frozen=True)
class EngineRequest:
    """What a caller asked for and what the machine offers: all :func:`choose_engine` looks at."""

    backend: str  # one of BACKENDS
    device: str  # the resolved device: "cpu", "cuda:0", ...
    compile: bool = False  # a torch.compile mode was asked for
    openvino_installed: bool = False
    precision: str = "auto"
    onnx_model: bool = False  # the model is an exported .onnx file (not a checkpoint or run folder)
    fold: bool = False  # one fold of a run folder was asked for
    model: str = "the model"  # how refusals name the model

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


@dataclass(frozen=True)
class EngineChoice:
    """The engine to load a model with. ``prefer_int8``: take a validated int8 model where there is one;
    ``fallback``: the engine to use instead when the ONNX export the chosen engine needs fails."""

    engine: str  # a key of polypseg.inference.predictor.ENGINES
    prefer_int8: bool = False
    fallback: str | None = None


@dataclass(frozen=True)
class _Refusal:
    message: str  # formatted with the request's fields


_Outcome = EngineChoice | _Refusal | Callable[[EngineRequest], EngineChoice]
_Rule = tuple[Callable[[EngineRequest], bool], _Outcome]

# The first rule whose condition holds decides. On CPU, "auto" takes OpenVINO where installed, else
# onnxruntime: the fastest engines whose Dice change against fp32 stayed within 0.005 on the shipped
# model (docs/benchmarks.md); int8 only where the precision is left to it (fp32 and bf16 are asked for).
# onnxruntime computes in fp32 (int8 for a quantised model), so bf16 is asked of OpenVINO or torch.
_RULES: tuple[_Rule, ...] = (
    (
        lambda r: r.onnx_model and r.backend == "torch",
        _Refusal("{model} is an ONNX model: use backend 'onnxruntime', 'openvino' or 'auto'"),
    ),
    (
        lambda r: r.onnx_model and (r.fold or r.compile),
        _Refusal("{model} is one ONNX model: fold and compile apply to checkpoints and run folders"),
    ),
    (
        lambda r: r.backend == "openvino" and r.device_type != "cpu",
        _Refusal("the openvino backend runs on the CPU, not {device}"),
    ),
    (
        lambda r: r.compile and r.backend in ("onnxruntime", "openvino"),
        _Refusal("compile applies to the torch backend, not {backend}"),
    ),
    (
        lambda r: engine_precision_problem(r.backend, r.precision) is not None,
        _Refusal("precision {precision}: {precision_problem}; use backend 'openvino' or 'auto'"),
    ),
    (lambda r: r.onnx_model and r.backend == "openvino", EngineChoice("openvino")),
    # an exported model runs as it is (never exported again, never int8 by choice), on OpenVINO where it can
    (
        lambda r: r.onnx_model and r.backend == "auto" and r.device_type == "cpu" and r.openvino_installed,
        EngineChoice("openvino"),
    ),
    (
        lambda r: r.onnx_model and r.precision == "bf16",
        _Refusal("precision bf16: {model} runs in bf16 on OpenVINO only (pip install 'polypseg[openvino]')"),
    ),
    (lambda r: r.onnx_model, EngineChoice("onnxruntime")),
    (lambda r: r.backend != "auto", lambda r: EngineChoice(r.backend)),
    (lambda r: r.device_type == "cuda" or r.compile, EngineChoice("torch")),
    (lambda r: r.precision == "bf16" and not r.openvino_installed, EngineChoice("torch")),
    (
        lambda r: True,
        lambda r: EngineChoice(
            "openvino" if r.openvino_installed else "onnxruntime", prefer_int8=r.precision == "auto", fallback="torch"
        ),
    ),
)


def engine_precision_problem(engine: str, precision: str) -> str | None:
    """Why ``engine`` cannot compute in ``precision``, or None: the one rule of predict's backends and
    explain's engines. onnxruntime computes in fp32 (int8 for a quantised model), never bf16."""
    if engine == "onnxruntime" and precision == "bf16":
        return "onnxruntime computes in fp32"
    return None


def check_backend(backend: str) -> None:
    """The one-line error of a backend name polypseg does not know (checked before anything is loaded)."""
    if backend not in BACKENDS:
        raise PredictorError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")


def choose_engine(request: EngineRequest) -> EngineChoice:
    """The engine for ``request``, or a :class:`PredictorError` naming why the combination cannot run."""
    check_backend(request.backend)
    for condition, outcome in _RULES:
        if condition(request):
            if isinstance(outcome, _Refusal):
                raise PredictorError(
                    outcome.message.format(
                        model=request.model,
                        device=request.device,
                        backend=request.backend,
                        precision=request.precision,
                        precision_problem=engine_precision_problem(request.backend, request.precision),
                    )
                )
            return outcome if isinstance(outcome, EngineChoice) else outcome(request)
    raise AssertionError("the last rule always holds")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Model source


@dataclass(frozen=True)
class ModelSource:
    """A model to load, as found on disk.

    For an ``.onnx`` file only ``path``, ``onnx`` and the threshold asked for are known here: the
    rest is in its sidecar, which the ONNX engines read. For checkpoints, ``onnx`` is filled in when
    an engine that runs ONNX exports them (:meth:`with_onnx`).
    """

    path: Path
    checkpoints: tuple[Path, ...] = ()
    onnx: tuple[Path, ...] = ()
    image_size: int | None = None
    threshold: float | None = None  # None: the ONNX sidecar's
    metadata: dict[str, Any] | None = None

    @property
    def is_onnx(self) -> bool:
        return self.path.suffix == ".onnx"

    def with_onnx(self, paths: list[Path]) -> ModelSource:
        return replace(self, onnx=tuple(paths))


def resolve_source(
    path_or_run: Path | str | None, *, fold: int | None = None, threshold: float | None = None
) -> ModelSource:
    """Find the model ``path_or_run`` names (see :func:`polypseg.models.pretrained.resolve_model`).

    The threshold is ``threshold`` if given, else the CV run's ``summary.json`` threshold, else the
    checkpoints' own, else 0.5; a run folder's ``fold=K`` keeps its fold K alone. The run is the folder
    named, or the run a named fold folder (``RUN/fold_K``) or fold checkpoint (``RUN/fold_K/best``) lies in:
    however one fold is named, it gets the threshold cross-validation chose for the run.
    """
    from polypseg.models.pretrained import resolve_model

    path = resolve_model(path_or_run)
    if path.suffix == ".onnx":
        return ModelSource(path, onnx=(path,), threshold=threshold)
    from polypseg.models.checkpoint import config_from_metadata, find_checkpoints, read_metadata

    checkpoints = _pick_fold(find_checkpoints(path), path, fold)
    metas = [read_metadata(c) for c in checkpoints]
    configs = [config_from_metadata(m, c) for c, m in zip(checkpoints, metas, strict=False)]
    summary = _run_summary(path, check_threshold=threshold is None)
    if threshold is None:  # a sidecar's threshold was checked by read_metadata
        threshold = float(summary.get("threshold", metas[0].get("threshold", 0.5)))
    metadata: dict[str, Any] = {
        "checkpoints": [str(c) for c in checkpoints],
        "config": metas[0]["config"],
        "metrics": metas[0].get("metrics", {})
        if len(metas) == 1
        else {fold_name(_fold_index(c)): m.get("metrics", {}) for c, m in zip(checkpoints, metas, strict=False)},
    }
    if summary:
        metadata["summary"] = summary
    image_size = int(configs[0].train.image_size)
    if any(int(c.train.image_size) != image_size for c in configs):
        raise PredictorError(f"the checkpoints under {path} were trained at different image sizes")
    return ModelSource(path, tuple(checkpoints), image_size=image_size, threshold=threshold, metadata=metadata)


def flip_tta_note(config: dict[str, Any], command: str, tta: bool = False) -> str | None:
    """The note for a model whose recipe evaluates with flip TTA (``train.tta_flip``, as the ``strong``
    recipe does; cross-validation then chose its threshold on TTA probabilities) run without it; else None."""
    if tta or not (config.get("train") or {}).get("tta_flip"):
        return None
    how = "pass --tta to run it as it was evaluated" if command == "predict" else "explain has no TTA"
    return (
        f"note: this model was evaluated with flip TTA (train.tta_flip) and its threshold chosen on TTA "
        f"probabilities; {command} runs it without TTA ({how})"
    )


def threshold_in_file(record: dict[str, Any]) -> str | None:
    """What is wrong with the threshold a file (summary, sidecar) records, or None."""
    problem = threshold_problem(record.get("threshold", 0.5))
    return None if problem is None else f"threshold {problem}"


def _fold_index(checkpoint: Path) -> int | None:
    return parse_fold_name(checkpoint.parent.name)


def _pick_fold(checkpoints: list[Path], path: Path, fold: int | None) -> list[Path]:
    if fold is None:
        return checkpoints
    folds = {_fold_index(c): c for c in checkpoints}
    if fold not in folds:
        raise PredictorError(f"--fold {fold}: {path} has folds {sorted(k for k in folds if k is not None)}")
    return [folds[fold]]


def run_folder_of(path: Path) -> Path | None:
    """The CV run folder whose ``summary.json`` speaks for ``path``: ``path`` itself, or the run a fold
    folder or a fold's checkpoint lies in; None for a lone checkpoint or a folder without a summary."""
    folder = path if path.is_dir() else path.parent
    candidates = [path] if path.is_dir() else []
    if parse_fold_name(folder.name) is not None:
        candidates.append(folder.parent)
    return next((c for c in candidates if RunDir(c).summary_path.is_file()), None)


def _run_summary(path: Path, *, check_threshold: bool) -> dict[str, Any]:
    """The ``summary.json`` of the run ``path`` is or lies in (empty for a lone checkpoint; see
    :func:`run_folder_of`); its threshold checked where it will be used."""
    folder = run_folder_of(path)
    if folder is None:
        return {}
    run = RunDir(folder)
    summary = run.read_summary() or {}
    if check_threshold and "threshold" in summary:
        problem = threshold_in_file(summary)
        if problem is not None:
            raise PredictorError(f"{run.summary_path}: its {problem}")
    return summary


def onnx_model_paths(paths: Path | str | Sequence[Path | str]) -> list[Path]:
    """One or several ``.onnx`` paths as a list, each checked to exist."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise PredictorError(f"ONNX model not found: {path}")
    return paths


def read_onnx_sidecars(
    paths: Sequence[Path], threshold: float | None, metadata: dict[str, Any] | None
) -> tuple[int, dict[str, Any], float]:
    """Input size, metadata and threshold of exported models, from the sidecars written beside them."""
    from polypseg.inference.export import read_onnx_metadata

    sidecars = [read_onnx_metadata(path) for path in paths]
    for path, sidecar in zip(paths, sidecars, strict=True):  # the rules checkpoint sidecars are read with
        problem = image_size_problem(sidecar.get("image_size"))
        problem = f"image_size {problem}" if problem else threshold_in_file(sidecar)
        if problem is not None:
            raise PredictorError(f"cannot load ONNX model {path}: its sidecar's {problem}")
    sizes = {s["image_size"] for s in sidecars}
    if len(sizes) != 1:
        raise PredictorError(f"ONNX models disagree on input size: {sorted(sizes)}")
    meta: dict[str, Any] = {
        "onnx": [str(p) for p in paths],
        "config": sidecars[0].get("config", {}),
        "metrics": sidecars[0].get("metrics", {}),
    }
    if any(s.get("quantization") for s in sidecars):
        meta["quantization"] = [s.get("quantization") for s in sidecars]
    meta.update(metadata or {})
    if threshold is None:
        threshold = float(sidecars[0].get("threshold", 0.5))
    return sizes.pop(), meta, threshold
