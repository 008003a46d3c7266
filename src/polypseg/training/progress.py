"""Training progress for the main process: a rich bar on a terminal, one plain line per epoch in a log."""

from __future__ import annotations

from typing import Any

import numpy as np


class TrainingProgress:
    """Training progress for the main process: a rich bar on a terminal, one plain line per epoch
    when the output is a log file (a bar cannot redraw there), silent when disabled."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self._bar = None
        self._lines = False
        self._description = description
        if enabled:
            from rich.console import Console

            if not Console().is_terminal:
                self._lines = True
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._task = self._bar.add_task(description, total=total, info="")

    def __enter__(self) -> TrainingProgress:
        if self._bar:
            self._bar.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        if self._bar:
            self._bar.__exit__(*args)

    def advance(self, steps: int = 1) -> None:
        if self._bar:
            self._bar.update(self._task, advance=steps)

    def epoch_done(self, record: dict[str, Any], epochs: int, history: list[dict[str, Any]]) -> None:
        """Show an epoch's loss, validation Dice and time (and, in a log, the time left to train)."""
        info = f"loss {record['train_loss']:.4f}" + (
            f" val dice {record['val_dice']:.4f}" if "val_dice" in record else ""
        )
        if self._bar:
            self._bar.update(self._task, info=info)
        elif self._lines:
            paused = f" (+{record['paused_seconds']:.0f} s paused)" if record.get("paused_seconds") else ""
            left = epochs - record["epoch"]
            # The median epoch: older histories count pauses in their seconds, the median ignores them.
            eta = (
                f", about {left * float(np.median([r['seconds'] for r in history])) / 60:.0f} min to go" if left else ""
            )
            print(
                f"{self._description}: epoch {record['epoch']}/{epochs}, {info}, {record['seconds']:.1f} s{paused}{eta}",
                flush=True,
            )
