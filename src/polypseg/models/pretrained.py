"""Models that ship with polypseg: fp16 safetensors checkpoints in ``polypseg/models/weights/``.

Each shipped model is an ordinary polypseg checkpoint pair (``NAME.safetensors`` with its sidecar
embedded, ``NAME.json`` readable beside it) whose sidecar carries a ``release`` section: the
training command, the data it saw and did not see, and its test metrics. ``weights/models.json``
is the registry: for each name, the file and the SHA-256 of its bytes, checked before every load,
so a truncated or altered file is refused by name instead of segmenting with wrong weights.

Nothing here downloads: the weights are inside the installed package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polypseg.errors import PolypsegError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
REGISTRY = "models.json"
DEFAULT_MODEL = "kvasir-unet-r34"


class PretrainedError(PolypsegError):
    """A shipped model is missing, unknown or does not match its recorded SHA-256."""


@dataclass(frozen=True)
class EarlierRelease:
    """A file that an earlier version of polypseg shipped under the same name, kept in git's history."""

    sha256: str
    size_bytes: int
    commit: str
    path: str  # the file's path in the repository at ``commit``
    summary: str

    def restore_command(self, dest: str) -> str:
        """The command that writes this release's weights to ``dest`` from a clone with full history."""
        return f"git show {self.commit}:{self.path} > {dest}"

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "bytes": self.size_bytes,
            "commit": self.commit,
            "path": self.path,
            "summary": self.summary,
        }


@dataclass(frozen=True)
class ShippedModel:
    """One entry of the registry."""

    name: str
    weights: Path
    sha256: str
    size_bytes: int
    summary: str
    earlier: tuple[EarlierRelease, ...] = ()

    @property
    def stem(self) -> Path:
        return self.weights.with_suffix("")

    def release(self) -> dict[str, Any]:
        """The ``release`` section of the model's sidecar (command, data, metrics)."""
        from polypseg.models.checkpoint import read_metadata

        return dict(read_metadata(self.stem).get("release", {}))


def _registry(weights_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    path = (weights_dir or WEIGHTS_DIR) / REGISTRY
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PretrainedError(f"{path}: unreadable model registry ({error})") from None
    return dict(data.get("models", {}))


def available_models(weights_dir: Path | None = None) -> list[ShippedModel]:
    """The shipped models, default first (``weights_dir``: another registry folder, for tests and releases)."""
    weights_dir = weights_dir or WEIGHTS_DIR
    entries = [
        ShippedModel(
            name=name,
            weights=weights_dir / entry["file"],
            sha256=entry["sha256"],
            size_bytes=int(entry.get("bytes", 0)),
            summary=entry.get("summary", ""),
            earlier=tuple(_earlier_release(item) for item in entry.get("earlier", [])),
        )
        for name, entry in _registry(weights_dir).items()
    ]
    return sorted(entries, key=lambda m: (m.name != DEFAULT_MODEL, m.name))


def _earlier_release(entry: dict[str, Any]) -> EarlierRelease:
    return EarlierRelease(
        sha256=entry["sha256"],
        size_bytes=int(entry.get("bytes", 0)),
        commit=entry["commit"],
        path=entry["path"],
        summary=entry.get("summary", ""),
    )


def get_model(name: str | None = None, weights_dir: Path | None = None, verify: bool = True) -> ShippedModel:
    """The shipped model ``name`` (default: the default model), its file checked against the registry's SHA-256."""
    from polypseg.models.checkpoint import file_sha256

    name = name or DEFAULT_MODEL
    models = {m.name: m for m in available_models(weights_dir)}
    if name not in models:
        known = ", ".join(models) or "none in this installation"
        raise PretrainedError(
            f"no shipped model named '{name}' (shipped: {known}); pass a checkpoint or run folder instead"
        )
    model = models[name]
    if not model.weights.is_file():
        raise PretrainedError(f"shipped model '{name}': {model.weights} is missing (reinstall polypseg)")
    if verify:
        actual = file_sha256(model.weights)
        if actual != model.sha256:
            raise PretrainedError(
                f"shipped model '{name}': {model.weights} has SHA-256 {actual[:12]}..., the registry records "
                f"{model.sha256[:12]}... (the file is damaged or was replaced; reinstall polypseg)"
            )
    return model


def resolve_model(spec: str | Path | None) -> Path:
    """What ``--model`` names: ``None`` -> the default shipped model; a shipped name; else a path.

    Returns a path that :func:`polypseg.models.checkpoint.find_checkpoints` understands (a checkpoint stem,
    a fold folder or a CV run folder). A path that exists wins over a shipped name.
    """
    if spec is None:
        return get_model().stem
    path = Path(spec)
    if path.exists() or path.with_suffix(".safetensors").exists():
        return path
    if str(spec) in {m.name for m in available_models()}:
        return get_model(str(spec)).stem
    return path


def release_model(
    checkpoint: Path | str,
    name: str,
    release: dict[str, Any],
    weights_dir: Path | None = None,
    summary: str = "",
    *,
    replaces: tuple[str, str] | None = None,
) -> ShippedModel:
    """Write ``checkpoint`` as the shipped model ``name``: fp16 floating tensors, ``release`` in its sidecar.

    Integer buffers (batch-norm counters) keep their dtype; loading casts the fp16 weights back
    into the fp32 model. Registers the file's SHA-256 in ``models.json``. A file replacing an
    earlier release of ``name`` must say where that one lives in git, ``replaces=(commit, path)``:
    the registry keeps it under ``earlier`` so that it stays restorable.
    """
    from polypseg.core.io_utils import atomic_write_text
    from polypseg.models.checkpoint import file_sha256, load_checkpoint, model_state, save_checkpoint_tensors

    source = load_checkpoint(checkpoint)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model_state(source.model).items()}
    extra = {
        k: v
        for k, v in source.metadata.items()
        if k not in ("format", "polypseg_version", "created", "config", "metrics", "threshold", "tensors_sha256")
    }
    extra["release"] = {"name": name, "dtype": "float16", **release}
    weights_dir = weights_dir or WEIGHTS_DIR
    weights_dir.mkdir(parents=True, exist_ok=True)
    weights = save_checkpoint_tensors(
        weights_dir / name,
        state,
        source.config,
        metrics=source.metadata.get("metrics", {}),
        threshold=source.threshold,
        extra=extra,
    )
    registry = _registry(weights_dir)
    registry[name] = {
        "file": weights.name,
        "sha256": file_sha256(weights),
        "bytes": weights.stat().st_size,
        "summary": summary,
        "earlier": _earlier_entries(registry.get(name), replaces, name),
    }
    atomic_write_text(weights_dir / REGISTRY, json.dumps({"models": registry}, indent=2, sort_keys=True) + "\n")
    return get_model(name, weights_dir)


def _earlier_entries(old: dict[str, Any] | None, replaces: tuple[str, str] | None, name: str) -> list[dict[str, Any]]:
    """The registry's ``earlier`` list once ``old`` (the entry being replaced) joins it, newest first."""
    if old is None:
        return []
    if replaces is None:
        raise PretrainedError(
            f"'{name}' is already shipped: pass replaces=(commit, path) naming where its file lives in git"
        )
    commit, path = replaces
    replaced = EarlierRelease(
        sha256=old["sha256"],
        size_bytes=int(old.get("bytes", 0)),
        commit=commit,
        path=path,
        summary=old.get("summary", ""),
    )
    return [replaced.to_json(), *old.get("earlier", [])]
