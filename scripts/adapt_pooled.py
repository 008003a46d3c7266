"""Pool the two by-sequence folds of an adapt setting: every CVC-ClinicDB frame held out once.

Usage: python scripts/adapt_pooled.py RUN_BY_SEQUENCE RUN_REVERSE --out pooled.json [--share 0.5] [--data CVC62]

Each RUN is a finished ``polypseg train --recipe adapt --test-list ...`` run folder of
``scripts/adapt_experiment.py`` (splits ``by_sequence`` and ``by_sequence_reverse``). For each one,
its held-out frames are scored by the shipped model, the fine-tuned model and their weight average
(``share`` of the fine-tuned weights), all with ``score_model``. The per-frame Dice changes of the
62 frames are pooled; the 95% interval of their mean comes from a bootstrap that resamples whole
sequences, since frames of one sequence are not independent. Nothing is trained, no weights are written.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from adapt_experiment import MODEL, cpu_model, score_model  # noqa: E402 - the experiment's scoring
from adapt_weight_average import averaged_state  # noqa: E402 - the same averaging

# First frame number of each of CVC-ClinicDB's 29 sequences (its README.txt): frame n belongs to
# sequence bisect_right(SEQUENCE_STARTS, n).
SEQUENCE_STARTS = (1, 26, 51, 68, 79, 104, 127, 152, 178, 200, 206, 228, 253, 278, 298, 318, 343, 364, 384,
                   409, 429, 448, 467, 479, 504, 529, 547, 572, 592)  # fmt: skip


def sequence_of(frame: str) -> int:
    """CVC-ClinicDB's sequence number (1-29) of a frame number."""
    return bisect.bisect_right(SEQUENCE_STARTS, int(frame))


def sequence_bootstrap(changes: dict[str, float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean per-frame change, resampling whole sequences with replacement."""
    by_sequence: dict[int, list[float]] = {}
    for frame, change in changes.items():
        by_sequence.setdefault(sequence_of(frame), []).append(change)
    sums = np.array([sum(v) for v in by_sequence.values()])
    counts = np.array([len(v) for v in by_sequence.values()])
    picks = np.random.default_rng(seed).integers(0, len(sums), (resamples, len(sums)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def fold_scores(run: Path, data: Path, share: float) -> dict[str, dict[str, float]]:
    """Per-frame Dice of the shipped, fine-tuned and averaged models on ``run``'s held-out frames."""
    from polypseg.models.checkpoint import load_checkpoint
    from polypseg.models.pretrained import resolve_model

    stems = json.loads((run / "split.json").read_text())["test"]
    shipped = load_checkpoint(resolve_model(MODEL)).model
    tuned = load_checkpoint(run / "best").model
    scores = {"shipped": score_model(shipped, data, stems)[0], "fine_tuned": score_model(tuned, data, stems)[0]}
    tuned.load_state_dict(averaged_state(shipped.state_dict(), tuned.state_dict(), share))
    scores["averaged"] = score_model(tuned.eval(), data, stems)[0]
    return {name: s["per_frame_dice"] for name, s in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs=2)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "cvc-clinicdb-test62")
    parser.add_argument("--share", type=float, default=0.5, help="Share of the fine-tuned weights (0-1).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    frames: dict[str, dict[str, float]] = {"shipped": {}, "fine_tuned": {}, "averaged": {}}
    results: dict = {"model": MODEL, "share": args.share, "machine": cpu_model(), "folds": {}}
    for run in args.runs:
        scores = fold_scores(run, args.data, args.share)
        results["folds"][run.name] = {name: float(np.mean(list(v.values()))) for name, v in scores.items()}
        for name, per_frame in scores.items():
            frames[name].update(per_frame)
        print(run.name, {k: round(v, 4) for k, v in results["folds"][run.name].items()}, flush=True)
    for name in ("fine_tuned", "averaged"):
        changes = {frame: frames[name][frame] - frames["shipped"][frame] for frame in frames["shipped"]}
        low, high = sequence_bootstrap(changes)
        results[f"pooled_{name}"] = {
            "frames": len(changes),
            "sequences": len({sequence_of(f) for f in changes}),
            "dice_shipped": float(np.mean(list(frames["shipped"].values()))),
            "dice": float(np.mean(list(frames[name].values()))),
            "mean_change": float(np.mean(list(changes.values()))),
            "interval_95": [low, high],
        }
        print(f"pooled {name}: change {results[f'pooled_{name}']['mean_change']:+.4f} [{low:+.4f}, {high:+.4f}]")
    results["per_frame_dice"] = frames
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
