"""This process's place in a ``torchrun`` job: rank, world size and its device.

Without ``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment) a run is a single process and
nothing here starts a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from polypseg.core.devices import resolve_device


@dataclass
class DistributedContext:
    """Rank/world size from torchrun's environment; a single process when not launched by it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistributedContext:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()


def resolve_training_device(device: str, context: DistributedContext) -> torch.device:
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None and context.enabled:
        resolved = torch.device("cuda", context.local_rank)
    if resolved.type == "cuda":
        # set_device needs an index; a bare "cuda" means the current device.
        torch.cuda.set_device(resolved.index if resolved.index is not None else torch.cuda.current_device())
    return resolved
