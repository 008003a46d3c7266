"""Checkpoints as safetensors weights plus a JSON sidecar: loading never unpickles or runs code.

A checkpoint ``NAME`` is the pair ``NAME.safetensors`` (tensors only) and ``NAME.json``
(format tag, polypseg version, resolved run config, metrics, decision threshold). Training state
for ``--resume`` uses the same format (optimizer tensors flattened into the safetensors file, the
rest in JSON).

**One atomic unit.** Each file is written atomically (temporary file + rename), but two files
cannot be replaced together. So the safetensors file is self-contained: its header metadata
carries the whole sidecar (``polypseg.sidecar``) and the SHA-256 of its tensors
(``polypseg.tensors_sha256``). It is written first; the ``.json`` beside it is a readable copy
written second. Whatever moment a process is killed at, the safetensors file describes itself,
and a ``.json`` left over from the previous write is ignored. Loading recomputes the tensors'
SHA-256 and refuses a file whose content changed since it was written.

Checkpoints written before this scheme (no embedded sidecar) still load from their ``.json``;
their training states are checked against the optimizer's step counter, which is stored with the
tensors, so a state cut between its two files is refused instead of resumed from mixed epochs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from polypseg._version import __version__
from polypseg.core.config import RunConfig
from polypseg.core.io_utils import atomic_write, atomic_write_text, json_text, read_json
from polypseg.core.rules import image_size_problem, threshold_problem
from polypseg.errors import PolypsegError

FORMAT = "polypseg-checkpoint-v1"
STATE_FORMAT = FORMAT + "-state"
SIDECAR_KEY = "polypseg.sidecar"
DIGEST_KEY = "polypseg.tensors_sha256"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the header size


class CheckpointError(PolypsegError):
    """A checkpoint is missing, incomplete or not a polypseg checkpoint."""


class TrainingStateError(CheckpointError):
    """A training state cannot be resumed (missing half, cut between writes, corrupt, other run)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, CPU) and its metadata."""

    model: nn.Module
    config: RunConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold", 0.5))


def checkpoint_paths(path: Path | str) -> tuple[Path, Path]:
    """Return ``(weights, sidecar)`` for a checkpoint given as either file or the shared stem."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as contiguous CPU copies (DDP and ``torch.compile`` wrappers removed)."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    # contiguous clones: safetensors refuses shared or strided storage
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


_model_state = model_state  # the name other modules used


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (independent of file layout)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def file_sha256(path: Path | str, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _header_metadata(weights: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors header, ``{}`` without one, ``None`` if unreadable."""
    try:
        with open(weights, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= _MAX_HEADER:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else None


def _embedded_sidecar(weights: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(sidecar, tensors digest)`` stored in a weights file's header, or ``(None, None)`` (old format)."""
    meta = _header_metadata(weights)
    if not meta or SIDECAR_KEY not in meta:
        return None, None
    try:
        sidecar = json.loads(meta[SIDECAR_KEY])
    except ValueError:
        raise CheckpointError(f"cannot load weights {weights}: the metadata in its header is corrupt") from None
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"cannot load weights {weights}: the metadata in its header is corrupt")
    return sidecar, meta.get(DIGEST_KEY)


def _write_pair(path: Path | str, tensors: dict[str, torch.Tensor], sidecar: dict[str, Any]) -> Path:
    """Weights (with the sidecar embedded) first, then the readable ``.json`` copy; both atomic."""
    weights, sidecar_path = checkpoint_paths(path)
    digest = tensors_digest(tensors)
    sidecar = {**sidecar, "tensors_sha256": digest}
    text = json_text(sidecar)
    header = {"format": str(sidecar["format"]), SIDECAR_KEY: text, DIGEST_KEY: digest}
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    atomic_write_text(sidecar_path, text + "\n")
    return weights


def save_checkpoint(
    path: Path | str,
    model: nn.Module,
    config: RunConfig,
    metrics: dict[str, Any] | None = None,
    threshold: float = 0.5,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``path.safetensors`` and ``path.json`` atomically; returns the weights path."""
    return save_checkpoint_tensors(path, model_state(model), config, metrics, threshold, extra)


def save_checkpoint_tensors(
    path: Path | str,
    state: dict[str, torch.Tensor],
    config: RunConfig,
    metrics: dict[str, Any] | None = None,
    threshold: float = 0.5,
    extra: dict[str, Any] | None = None,
) -> Path:
    """:func:`save_checkpoint` from a state dict already on the CPU."""
    return _write_pair(
        path,
        state,
        {
            "format": FORMAT,
            "polypseg_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(),
            "metrics": metrics or {},
            "threshold": threshold,
            **(extra or {}),
        },
    )


def read_metadata(path: Path | str) -> dict[str, Any]:
    """A checkpoint's metadata: the copy inside the weights file, else (older files) the ``.json``."""
    weights, sidecar = checkpoint_paths(path)
    embedded, _ = _embedded_sidecar(weights) if weights.is_file() else (None, None)
    if embedded is not None:
        metadata = embedded
    else:
        if not sidecar.is_file():
            raise CheckpointError(f"checkpoint metadata not found: {sidecar}")
        try:
            metadata = read_json(sidecar)
        except (ValueError, UnicodeDecodeError) as error:
            raise CheckpointError(f"checkpoint metadata {sidecar} is not valid JSON: {error}") from None
        except OSError as error:
            raise CheckpointError(f"cannot read checkpoint metadata {sidecar}: {error.strerror or error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise CheckpointError(f"{sidecar} is not a polypseg checkpoint (format {found!r})")
    # The --threshold rule: a threshold outside (0, 1) would give constant masks without a word.
    problem = threshold_problem(metadata.get("threshold", 0.5))
    if problem is not None:
        raise CheckpointError(f"cannot load weights {weights}: its threshold {problem}")
    return metadata


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip()
    if isinstance(error, KeyError) and error.args:
        key = str(error.args[0])
        text = key.split(", supported", 1)[0] if " " in key else f"missing or unknown field {key!r}"
    text = text.splitlines()[0] if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], limit: int = 3) -> str:
    """Which tensors of ``given`` do not fit ``expected`` (names, shapes), as one line; '' if all fit."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} is {tuple(given[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, items in (("shape differs", shapes), ("missing", missing), ("unexpected", unexpected)):
        if items:
            shown = "; ".join(items[:limit]) + (f"; ... {len(items) - limit} more" if len(items) > limit else "")
            parts.append(f"{len(items)} tensor(s) {label}: {shown}")
    return ". ".join(parts)


def _load_tensors(
    weights: Path, recorded_digest: str | None, error_type: type[CheckpointError] = CheckpointError
) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as error:  # noqa: BLE001 - a corrupt or foreign file is a user-facing error
        raise error_type(f"cannot load weights {weights}: {_first_line(error)}") from None
    if recorded_digest is not None and tensors_digest(tensors) != recorded_digest:
        raise error_type(
            f"cannot load weights {weights}: its tensors do not match the SHA-256 recorded when it was written "
            "(the file is corrupt or was modified)"
        )
    return tensors


def verify_weights(path: Path | str) -> None:
    """Read a checkpoint's tensors and check them against the SHA-256 recorded in the file; a
    :class:`CheckpointError` (the one line of a corrupt checkpoint) if they cannot be read or differ."""
    weights, _ = checkpoint_paths(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights}")
    _load_tensors(weights, _embedded_sidecar(weights)[1])


def config_from_metadata(metadata: Mapping[str, Any], weights: Path | str) -> RunConfig:
    """The run config in a checkpoint's metadata, or the one-line error of a corrupt checkpoint."""
    try:
        config = RunConfig.from_dict(metadata["config"])
        config.model.encoder_weights = "none"  # the weights come from the checkpoint
        config.train.init_from = "none"
        problem = image_size_problem(config.train.image_size)  # the rule training configs are checked with
        if problem is not None:
            raise ValueError(f"train.image_size {problem}")
    except Exception as error:  # noqa: BLE001 - unknown fields, wrong types, a missing config: a bad file
        raise CheckpointError(
            f"cannot load weights {weights}: its metadata describes no model polypseg can build ({_first_line(error)})"
        ) from None
    return config


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the JSON config and load the safetensors weights (strict).

    Any failure (missing file, corrupt weights, a sidecar naming an unknown architecture, encoder
    or field, tensors that do not fit) is one :class:`CheckpointError` naming the file.
    """
    from polypseg.models.factory import create_model

    weights, sidecar = checkpoint_paths(path)
    metadata = read_metadata(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights}")
    _, digest = _embedded_sidecar(weights)
    config = config_from_metadata(metadata, weights)
    try:
        # Built on the meta device: no random initialisation, on every load, for the file's tensors to overwrite.
        with torch.device("meta"):
            model = create_model(config.model)
    except Exception as error:  # noqa: BLE001 - a sidecar this version cannot build is a bad file
        raise CheckpointError(
            f"cannot load weights {weights}: its metadata describes no model polypseg can build ({_first_line(error)})"
        ) from None
    state = _load_tensors(weights, digest)
    expected = model.state_dict()
    mismatch = state_mismatch(expected, state)
    if mismatch:
        raise CheckpointError(
            f"cannot load weights {weights}: they do not fit the model described in {sidecar.name}: {mismatch}"
        )
    # Each tensor in the model's dtype, as copying into the built model would (an fp16 file gives an fp32 model).
    state = {name: tensor.to(expected[name].dtype) for name, tensor in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"cannot load weights {weights}: {_first_line(error)}") from None
    if any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers())):
        # A buffer outside the state dict (none of the registered architectures has one) has no
        # value in the file: build the model for real so it gets its constructor's value.
        built = create_model(config.model)
        built.load_state_dict(state, strict=True)
        model = built
    model.eval().to(device)
    return Checkpoint(model=model, config=config, metadata=metadata, path=weights)


def checkpoint_content_key(path: Path | str) -> str:
    """SHA-256 of what a checkpoint is: its weights file's bytes and its metadata.

    Derived files (ONNX exports, int8 models) are keyed by this, so a checkpoint whose content
    changes, whatever its size and modification time, never answers from an old export.
    """
    weights, sidecar = checkpoint_paths(path)
    # Memo within one process, keyed by stat including ctime: rewriting a file and restoring its
    # modification time still changes its ctime, so a changed file is always hashed again.
    stamp = tuple(
        (p.resolve(), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
        for p, s in ((p, p.stat()) for p in (weights, sidecar) if p.exists())
    )
    if stamp in _CONTENT_KEYS:
        return _CONTENT_KEYS[stamp]
    metadata = read_metadata(path)
    digest = hashlib.sha256(file_sha256(weights).encode())
    digest.update(json_text({k: v for k, v in metadata.items() if k != "created"}).encode())
    _CONTENT_KEYS[stamp] = digest.hexdigest()
    return _CONTENT_KEYS[stamp]


_CONTENT_KEYS: dict[tuple, str] = {}


def find_checkpoints(path: Path | str) -> list[Path]:
    """Checkpoints named by ``path``: a checkpoint file/stem, a fold folder, or a CV run folder.

    For a run folder, returns each fold's ``best`` checkpoint in fold order.
    """
    path = Path(path)
    weights, sidecar = checkpoint_paths(path)
    if weights.is_file() and (sidecar.is_file() or _embedded_sidecar(weights)[0] is not None):
        return [weights]  # the weights file carries its sidecar: the .json is only a readable copy
    if path.is_dir():
        from polypseg.core.runs import RunDir

        run = RunDir(path)
        direct = run.best_checkpoint().with_suffix(".safetensors")
        if direct.is_file():
            return [direct]
        folds = run.fold_checkpoints()
        if folds:
            return folds
        training = [i for i in run.fold_indices() if run.fold_still_training(i)]
        if training:
            first = run.fold_dir(training[0])
            raise CheckpointError(
                f"{path}: no fold has finished yet ({first.name} is still training); name a fold folder, "
                f"e.g. {first}, to use its best checkpoint so far"
            )
    raise CheckpointError(
        f"no polypseg checkpoint found at {path} (expected NAME.safetensors + NAME.json, or a run folder)"
    )


# ------------------------------------------------------------------------------------------------
# Training state


def training_state_exists(path: Path | str) -> bool:
    """True when either file of a training state is present."""
    return any(p.is_file() for p in checkpoint_paths(path))


def remove_training_state(path: Path | str) -> None:
    """Delete a training state: the ``.json`` copy first, then the weights that define it."""
    weights, sidecar = checkpoint_paths(path)
    sidecar.unlink(missing_ok=True)
    weights.unlink(missing_ok=True)


def save_training_state(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    ema_model: nn.Module | None = None,
    best_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Everything ``--resume`` needs, without pickle, as one self-describing safetensors file.

    ``state`` (epoch, history, ...) is embedded in the file's header and copied to the ``.json``.
    ``best_state`` (the best epoch's weights, when they are not the current ones) travels with it,
    so resuming can restore ``best.*`` to match the state whatever was written after it.
    """
    tensors = {f"model.{k}": v for k, v in model_state(model).items()}
    if ema_model is not None:
        # AveragedModel as a whole (incl. n_averaged), not unwrapped like a DDP model
        tensors.update(
            {f"ema.{k}": v.detach().to("cpu").contiguous().clone() for k, v in ema_model.state_dict().items()}
        )
    if best_state is not None:
        tensors.update({f"best.{k}": v.detach().to("cpu").contiguous() for k, v in best_state.items()})
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in opt_state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{param_id}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    _write_pair(
        path,
        tensors,
        {
            "format": STATE_FORMAT,
            "polypseg_version": __version__,
            "optimizer_param_groups": opt_state["param_groups"],
            "optimizer_scalars": scalars,
            **state,
        },
    )


def _optimizer_steps(tensors: Mapping[str, torch.Tensor]) -> set[int]:
    return {
        int(round(float(v.reshape(-1)[0])))
        for k, v in tensors.items()
        if k.startswith("optim.") and k.endswith(".step") and v.numel()
    }


def load_training_state(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_model: nn.Module | None = None,
    steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """Restore model, EMA and optimizer in place; return the state (epoch, history, ...).

    The state is verified first and :class:`TrainingStateError` explains any refusal: a missing
    half, tensors that changed since they were written, or (given ``steps_per_epoch``) an optimizer
    step count that does not match the recorded epoch, which is what an old-format pair cut between
    its two writes looks like. When the state carries the best epoch's weights they are returned as
    ``state["best_state"]``.
    """
    weights, sidecar = checkpoint_paths(path)
    where = weights.parent
    restart = f"to start this training over, delete {where / weights.stem}.* (finished folds of a CV run are kept)"
    if not weights.is_file():
        raise TrainingStateError(f"the training state in {where} is incomplete: {weights.name} is missing; {restart}")
    meta, digest = _embedded_sidecar(weights)
    if meta is None:  # written before the state was one file: the .json must be there, and agree
        if not sidecar.is_file():
            raise TrainingStateError(
                f"the training state in {where} is incomplete: {sidecar.name} is missing; {restart}"
            )
        try:
            meta = read_json(sidecar)
        except (ValueError, UnicodeDecodeError) as error:
            raise TrainingStateError(f"{sidecar} is not valid JSON ({error}); {restart}") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise TrainingStateError(f"{weights} is not a polypseg training state; {restart}")
    tensors = _load_tensors(weights, digest, TrainingStateError)
    epoch = int(meta.get("epoch", 0))
    if steps_per_epoch is not None:
        expected = int(meta.get("global_step", epoch * steps_per_epoch))
        steps = _optimizer_steps(tensors)
        # More steps than the record: the weights are newer than it (a kill between the two files
        # of an old-format state). Fewer can be legitimate (a loss scaler skips overflowing steps).
        if steps and max(steps) > expected:
            found = ", ".join(str(s) for s in sorted(steps))
            raise TrainingStateError(
                f"the training state in {where} is inconsistent: its weights were saved after {found} optimizer step(s), "
                f"but its record says epoch {epoch} ({expected} steps of {steps_per_epoch}); it was cut between two writes "
                f"or the run's batch size or process count changed. Refusing to resume from mixed epochs; {restart}"
            )
    model_tensors = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    target = getattr(model, "module", model)
    target = getattr(target, "_orig_mod", target)
    mismatch = state_mismatch(target.state_dict(), model_tensors)
    if mismatch:
        raise TrainingStateError(f"the training state {weights} does not fit this run's model: {mismatch}")
    target.load_state_dict(model_tensors, strict=True)
    if ema_model is not None:
        ema_tensors = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not ema_tensors:
            raise TrainingStateError(
                f"the training state {weights} has no weight average (EMA), but this run uses one; {restart}"
            )
        ema_model.load_state_dict(ema_tensors, strict=True)
    opt_state: dict[Any, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            opt_state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta.get("optimizer_scalars", {}).items():
        opt_state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer_param_groups"]})
    _match_parameter_layout(optimizer)
    best = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")}
    meta = dict(meta)
    if best:
        meta["best_state"] = best
    meta["state_format"] = "one file" if digest is not None else "two files (older polypseg)"
    return meta


def _match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each restored optimizer moment its parameter's memory layout (e.g. channels-last).

    The state is saved contiguous and ``load_state_dict`` keeps that layout, but the fused Adam
    kernels walk a parameter and its moments as flat memory: with a channels-last parameter (bf16
    training on a CPU) and contiguous moments, every update after a resume used the moments of
    other elements, so the resumed run silently diverged from the uninterrupted one.
    """
    for param, values in optimizer.state.items():
        for name, value in values.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                values[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def pick_checkpoint(model: Path, fold: int | None) -> Path:
    """The one checkpoint a single-model command (explain, predict --fold) uses: a lone checkpoint, or fold
    ``fold`` (default 0) of a CV run; a one-line error names the folds there are."""
    from polypseg.core.runs import parse_fold_name

    paths = find_checkpoints(model)
    if len(paths) == 1:
        if fold is not None and parse_fold_name(paths[0].parent.name) != fold:
            raise PolypsegError(f"--fold {fold}: {model} is a single checkpoint, not a CV run folder")
        return paths[0]
    wanted = 0 if fold is None else fold
    for path in paths:
        if parse_fold_name(path.parent.name) == wanted:
            return path
    available = ", ".join(str(parse_fold_name(p.parent.name)) for p in paths)
    raise PolypsegError(f"--fold {fold}: {model} has folds {available}")
