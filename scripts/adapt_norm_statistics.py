"""Re-estimate the shipped model's BatchNorm statistics on corrected frames (AdaBN) and score it.

Usage: python scripts/adapt_norm_statistics.py --split select [--split by_sequence ...] --out results.json [--data CVC62]

For each split of ``scripts/adapt_experiment.py`` the shipped model's BatchNorm running means and
variances are replaced by those of the split's corrected frames (one forward pass of all of them in
one batch, float32, masks unused); nothing else changes. The shipped and the recalibrated model are
then scored on the split's held-out frames with the same function (``score_model``). Nothing is
trained and no weights are written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from adapt_experiment import MODEL, cpu_model, score_model, splits  # noqa: E402 - the experiment's splits and scoring

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_norm_statistics(model: nn.Module, images: torch.Tensor) -> None:
    """Replace every BatchNorm layer's running statistics by those of ``images`` (one batch)."""
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: after one batch, exactly that batch's statistics
        norm.train()
    model(images)
    model.eval()


def corrected_images(data: Path, stems: list[str]) -> torch.Tensor:
    """The corrected frames at the size and normalisation the model is scored with, float32."""
    from polypseg.core.recipes import get_recipe
    from polypseg.data.cache import build_cache
    from polypseg.inference.inferer import model_input
    from polypseg.training.adapt import match_init_size

    config = get_recipe("adapt")
    match_init_size(config)
    cache = build_cache(data, config.train.image_size, progress=False).subset(stems)
    return model_input(cache.images, "cpu", precision=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "cvc-clinicdb-test62")
    parser.add_argument("--split", action="append", choices=("select", "by_sequence", "random"), required=True)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random split.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from polypseg.data.pairing import index_dataset
    from polypseg.models.checkpoint import load_checkpoint
    from polypseg.models.pretrained import resolve_model

    stems = [sample.stem for sample in index_dataset(args.data).samples]
    results = {"model": MODEL, "data": args.data.name, "machine": cpu_model(), "splits": {}}
    results["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    for name in args.split:
        corrected, held_out = splits(stems, args.seed)[name]
        model = load_checkpoint(resolve_model(MODEL)).model.float()
        before, _ = score_model(model, args.data, held_out)
        started = time.perf_counter()
        recalibrate_norm_statistics(model, corrected_images(args.data, corrected))
        seconds = time.perf_counter() - started
        after, precision = score_model(model, args.data, held_out)
        keys = ("dice", "iou", "precision", "sensitivity")
        results["splits"][name] = {
            "corrected": corrected,
            "held_out": held_out,
            "before": {k: before[k] for k in keys},
            "after": {k: after[k] for k in keys},
            "dice_change": after["dice"] - before["dice"],
            "recalibration_seconds": round(seconds, 2),
            "scored_in": precision,
        }
        print(f"{name}: Dice {before['dice']:.4f} -> {after['dice']:.4f} ({seconds:.1f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
