"""Average a fine-tuned model's weights with the model it started from, and score the average.

Usage: python scripts/adapt_weight_average.py RUN [RUN ...] --out averages.json [--share 0.5] [--data CVC62]
       [--save CHECKPOINT]

Each RUN is a finished ``polypseg train --recipe adapt --test-list ...`` run folder. Its best
checkpoint and the shipped model are averaged tensor by tensor (``share`` of the fine-tuned
weights; BatchNorm statistics included, integer counters kept), then scored on the run's own test
stems exactly as ``scripts/adapt_experiment.py`` scores the shipped model ("before") and
``polypseg train`` scores the fine-tuned one ("after"): the ``adapt`` recipe's evaluation at the
shipped model's input size. Nothing is trained. With ``--save`` (one RUN only) the average is also
written as a checkpoint (``CHECKPOINT.safetensors`` + ``.json``, the run's config and threshold)
that ``polypseg predict``/``serve --model CHECKPOINT`` load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from adapt_experiment import MODEL, score_model  # noqa: E402 - the shipped model and its evaluation


def averaged_state(start: dict, tuned: dict, share: float) -> dict:
    """``share`` of ``tuned`` plus ``1 - share`` of ``start`` for floating tensors; others from ``tuned``."""
    return {
        name: (share * tensor + (1 - share) * start[name].to(tensor.dtype)) if tensor.is_floating_point() else tensor
        for name, tensor in tuned.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "cvc-clinicdb-test62")
    parser.add_argument("--share", type=float, default=0.5, help="Share of the fine-tuned weights (0-1).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save", type=Path, help="Write the average of the one RUN as this checkpoint.")
    args = parser.parse_args()
    if args.save is not None and len(args.runs) != 1:
        parser.error("--save takes one RUN")

    from polypseg.models.checkpoint import load_checkpoint, save_checkpoint
    from polypseg.models.pretrained import resolve_model

    start = load_checkpoint(resolve_model(MODEL)).model.state_dict()
    results = {"model": MODEL, "share": args.share, "data": args.data.name, "runs": {}}
    for run in args.runs:
        tuned = load_checkpoint(run / "best")
        stems = json.loads((run / "split.json").read_text())["test"]
        tuned.model.load_state_dict(averaged_state(start, tuned.model.state_dict(), args.share))
        scores, _ = score_model(tuned.model.eval(), args.data, stems)
        averaged = {k: scores[k] for k in ("dice", "iou", "precision", "sensitivity")}
        results["runs"][str(run)] = {"held_out": len(stems), "averaged": averaged}
        print(f"{run}: averaged Dice {results['runs'][str(run)]['averaged']['dice']:.4f}", flush=True)
        if args.save is not None:
            extra = {"weight_average": {"share": args.share, "fine_tuned": str(run), "start": MODEL}}
            saved = save_checkpoint(args.save, tuned.model, tuned.config, threshold=tuned.threshold, extra=extra)
            print(f"saved {saved}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
