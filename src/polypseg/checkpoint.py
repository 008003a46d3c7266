"""Checkpoints as safetensors weights plus a JSON sidecar: loading never unpickles or runs code.

A checkpoint ``NAME`` is the pair ``NAME.safetensors`` (tensors only) and ``NAME.json``
(format tag, polypseg version, resolved run config, metrics, decision threshold). Both are written
atomically. Training state for ``--resume`` uses the same format (optimizer tensors flattened
into the safetensors file, the rest in JSON).
"""

from __future__ import annotations

from polypseg.errors import PolypsegError

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from polypseg._version import __version__
from polypseg.config import RunConfig
from polypseg.io_utils import atomic_write, atomic_write_json, read_json

FORMAT = "polypseg-checkpoint-v1"


class CheckpointError(PolypsegError):
    """A checkpoint is missing, incomplete or not a polypseg checkpoint."""


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


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    # contiguous clones: safetensors refuses shared or strided storage
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    path: Path | str,
    model: nn.Module,
    config: RunConfig,
    metrics: dict[str, Any] | None = None,
    threshold: float = 0.5,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``path.safetensors`` and ``path.json`` atomically; returns the weights path."""
    weights, sidecar = checkpoint_paths(path)
    state = _model_state(model)
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}))
    atomic_write_json(
        sidecar,
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
    return weights


def read_metadata(path: Path | str) -> dict[str, Any]:
    _, sidecar = checkpoint_paths(path)
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint metadata not found: {sidecar}")
    try:
        metadata = read_json(sidecar)
    except ValueError as error:
        raise CheckpointError(f"checkpoint metadata {sidecar} is not valid JSON: {error}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar} is not a polypseg checkpoint (format {metadata.get('format')!r})")
    return metadata


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the JSON config and load the safetensors weights (strict)."""
    from polypseg.models import create_model

    weights, _ = checkpoint_paths(path)
    metadata = read_metadata(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights}")
    config = RunConfig.from_dict(metadata["config"])
    config.model.encoder_weights = "none"  # the weights come from the checkpoint
    model = create_model(config.model)
    try:
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state, strict=True)
    except Exception as error:  # noqa: BLE001 - a corrupt or foreign file is a user-facing error
        raise CheckpointError(f"cannot load weights {weights}: {str(error).splitlines()[0]}") from None
    model.eval().to(device)
    return Checkpoint(model=model, config=config, metadata=metadata, path=weights)


def find_checkpoints(path: Path | str) -> list[Path]:
    """Checkpoints named by ``path``: a checkpoint file/stem, a fold folder, or a CV run folder.

    For a run folder, returns each fold's ``best`` checkpoint in fold order.
    """
    path = Path(path)
    weights, sidecar = checkpoint_paths(path)
    if weights.is_file() and sidecar.is_file():
        return [weights]
    if path.is_dir():
        direct = path / "best.safetensors"
        if direct.is_file():
            return [direct]
        folds = sorted(path.glob("fold_*/best.safetensors"), key=lambda p: int(p.parent.name.split("_")[1]))
        if folds:
            return folds
    raise CheckpointError(f"no polypseg checkpoint found at {path} (expected NAME.safetensors + NAME.json, or a run folder)")


def save_training_state(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    ema_model: nn.Module | None = None,
) -> None:
    """Everything ``--resume`` needs, without pickle: tensors to safetensors, the rest to JSON."""
    weights, sidecar = checkpoint_paths(path)
    tensors = {f"model.{k}": v for k, v in _model_state(model).items()}
    if ema_model is not None:
        # AveragedModel as a whole (incl. n_averaged), not unwrapped like a DDP model
        tensors.update({f"ema.{k}": v.detach().to("cpu").contiguous().clone() for k, v in ema_model.state_dict().items()})
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in opt_state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{param_id}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT + "-state"}))
    atomic_write_json(
        sidecar,
        {
            "format": FORMAT + "-state",
            "polypseg_version": __version__,
            "optimizer_param_groups": opt_state["param_groups"],
            "optimizer_scalars": scalars,
            **state,
        },
    )


def load_training_state(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Restore model, EMA and optimizer in place; return the JSON part (epoch, history, ...)."""
    weights, sidecar = checkpoint_paths(path)
    meta = read_json(sidecar)
    if meta.get("format") != FORMAT + "-state":
        raise CheckpointError(f"{sidecar} is not a polypseg training state")
    tensors = load_file(str(weights), device="cpu")
    getattr(model, "module", model).load_state_dict(
        {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True
    )
    if ema_model is not None:
        ema_model.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
    opt_state: dict[Any, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            opt_state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta.get("optimizer_scalars", {}).items():
        opt_state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer_param_groups"]})
    return meta
