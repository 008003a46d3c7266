"""What a training run keeps between epochs: :class:`TrainingState` (the epochs done, their history,
the best epoch) and :class:`BestCheckpoint` (which writes ``best.*`` when an epoch beats the best so far).

Both are saved in, and restored from, the training state (:func:`polypseg.models.checkpoint.save_training_state`)
so a resumed run continues exactly where the saved one stood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polypseg.core.config import RunConfig
from polypseg.models.checkpoint import model_state, read_metadata, save_checkpoint_tensors


@dataclass
class BestCheckpoint:
    """The best epoch so far, its record and a CPU copy of its weights; ``best.*`` is rewritten each time
    an epoch beats it (without validation an epoch's score is its index: the latest is best)."""

    stem: Path  # best.{safetensors,json}
    score: float = -math.inf
    epoch: int = 0
    record: dict[str, Any] = field(default_factory=dict)  # metrics, extra and tensors_sha256 of best.*
    tensors: dict[str, torch.Tensor] | None = None

    def offer(
        self, score: float, record: dict[str, Any], model: nn.Module, config: RunConfig, *, validated: bool, init: Any
    ) -> None:
        """Keep ``model`` as the best if the epoch of ``record`` scores higher than the best so far."""
        if not score > self.score:
            return
        epoch = int(record["epoch"])
        self.score, self.epoch = score, epoch
        self.tensors = model_state(model)
        self.record = {
            "metrics": {k: v for k, v in record.items() if k.startswith("val_")},
            "extra": {
                "epoch": epoch,
                "selected_on": "inner validation split" if validated else "last epoch",
                **({"init": init} if init else {}),
            },
        }
        weights = save_checkpoint_tensors(
            self.stem, self.tensors, config, self.record["metrics"], extra=self.record["extra"]
        )
        self.record["tensors_sha256"] = read_metadata(weights)["tensors_sha256"]

    def tensors_for_state(self, epoch: int) -> dict[str, torch.Tensor] | None:
        """The weights a state saved after ``epoch`` must carry: none when they are that epoch's own."""
        return None if self.epoch == epoch else self.tensors

    @classmethod
    def from_state(cls, stem: Path, saved: dict[str, Any], model: nn.Module) -> BestCheckpoint:
        """The best epoch a loaded training state records; ``model`` holds the state's weights."""
        score = saved["best_score"]
        best = cls(stem, -math.inf if score is None else score, saved["best_epoch"], saved.get("best", {}))
        best.tensors = saved.get("best_state")
        if best.tensors is None and best.epoch == saved["epoch"]:
            # A state saved at its best epoch holds no separate copy: the weights just loaded are
            # that epoch's, and later states must carry them until a better epoch comes.
            best.tensors = model_state(model)
        return best


@dataclass
class TrainingState:
    """Where a training run stands: the epochs done, their history and the best epoch so far."""

    epoch: int
    history: list[dict[str, Any]]
    best: BestCheckpoint

    def to_state(self, steps_per_epoch: int) -> dict[str, Any]:
        """The record :func:`polypseg.models.checkpoint.save_training_state` stores (-inf is stored as null)."""
        return {
            "epoch": self.epoch,
            "global_step": self.epoch * steps_per_epoch,
            "history": self.history,
            "best_score": self.best.score,
            "best_epoch": self.best.epoch,
            "best": self.best.record,
        }
