"""Score a finished `polypseg train` run's best checkpoint on its own inner validation split.

Usage: python scripts/val_choices.py TRAIN_DIR [--data KVASIR] [--out TRAIN_DIR/val_choices.json]

For inference choices that must be made without the test images: mean Dice and IoU at threshold
0.5 on the run's inner validation images (split.json "val"), without and with flip test-time
augmentation, in fp32 (the shipped file's precision does not enter). The test images are not read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_dir", type=Path)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "kvasir-seg")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from polypseg.core.io_utils import atomic_write_json
    from polypseg.core.runs import RunDir
    from polypseg.data.cache import build_cache
    from polypseg.models.checkpoint import load_checkpoint
    from polypseg.training.evaluation import evaluate_probabilities, predict_probabilities

    run = RunDir(args.train_dir)
    split = run.read_split()
    if split is None or not split.get("val"):
        sys.exit(f"error: {run.path} has no split.json with inner validation images")
    best = load_checkpoint(run.best_checkpoint())
    val = build_cache(args.data, best.config.train.image_size, progress=False).subset(split["val"])
    result: dict[str, object] = {"n_images": len(val.stems), "threshold": 0.5, "precision": "fp32"}
    for label, tta in (("plain", False), ("flip_tta", True)):
        probs = predict_probabilities(best.model, val.images, precision="fp32", batch_size=16, tta_flip=tta)
        at = evaluate_probabilities(probs, val.masks, val.stems, thresholds=(0.5,)).compute()["at"]["0.5"]
        result[label] = {"dice": at["dice"], "iou": at["iou"]}
        print(f"{label}: Dice {at['dice']:.4f}, IoU {at['iou']:.4f} on {len(val.stems)} inner-validation images")
    atomic_write_json(args.out or run.path / "val_choices.json", result)


if __name__ == "__main__":
    main()
