"""How much a CV run's recorded AUC-ROC loses to how it is computed, on one fold.

Usage: python scripts/auc_resolution.py RUN_DIR --fold K [--data KVASIR] [--out FILE.json]

`polypseg cv` stores each fold's held-out probabilities as uint8 (``oof.npz``) and computes the
pixel AUC from a 1000-bin histogram (:class:`polypseg.metrics.segmentation.SegmentationMetrics`), so pixels that
share a level or a bin count as ties. This script predicts the fold's held-out images again with
the fold's best checkpoint, in the run's precision, and prints the AUC four ways: exact on the
float probabilities (`polypseg.metrics.segmentation.roc_auc_exact`), exact on the uint8 levels, and the
histogram on each. It reads only the fold's own held-out images and chooses nothing. Folds evaluated
from commit dfa3733 (2026-12-01) on record the first in their metrics.json (`auc_exact`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "kvasir-seg")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from polypseg.core.runs import RunDir, dequantize_probabilities, quantize_probabilities
    from polypseg.data.cache import build_cache
    from polypseg.metrics.segmentation import SegmentationMetrics, roc_auc_exact
    from polypseg.models.checkpoint import load_checkpoint
    from polypseg.training.loop import predict_with_recipe

    run = RunDir(args.run_dir)
    test = next(f for f in run.read_splits()["folds"] if f["fold"] == args.fold)["test"]
    checkpoint = load_checkpoint(run.best_checkpoint(args.fold), device="cpu")
    cache = build_cache(args.data, checkpoint.config.train.image_size, progress=False).subset(test)
    probs = predict_with_recipe(checkpoint.model, cache.images, checkpoint.config.train, torch.device("cpu"))
    levels = dequantize_probabilities(quantize_probabilities(probs)).numpy()
    probs = probs.float().numpy()
    masks = np.asarray(cache.masks, dtype=bool)

    def histogram_auc(values: np.ndarray) -> float:
        metrics = SegmentationMetrics()
        metrics.update(torch.from_numpy(values), torch.from_numpy(masks))
        return float(metrics.auc())

    result = {
        "run": str(args.run_dir),
        "fold": args.fold,
        "n_images": len(test),
        "precision": checkpoint.config.train.precision,
        "auc_exact_float": roc_auc_exact(probs, masks),
        "auc_exact_uint8": roc_auc_exact(levels, masks),
        "auc_histogram_float": histogram_auc(probs),
        "auc_histogram_uint8 (recorded)": histogram_auc(levels),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
