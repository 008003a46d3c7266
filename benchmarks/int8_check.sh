#!/usr/bin/env bash
# The int8 check with a fully trained model: the Dice change of the int8 onnxruntime model
# against fp32, for fold 0's best checkpoint of a finished CV run, calibrated on 64 of fold 0's
# training images and validated on fold 0's held-out images (never seen in training). It runs on
# the CPU (onnxruntime), so on a GPU machine it costs no GPU work:
#   source benchmarks/gpu_env.sh && RUN=/tmp/runs/skip-ablation/with-skips bash benchmarks/int8_check.sh
# The images come from KVASIR (default the carried 256 px cache), so Dice is scored at the cache's
# resolution, not at each image's original size as in the 2-core CPU checks of docs/benchmarks.md.
# Writes $RESULTS/bench/int8_dice.json. Other settings: benchmarks/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RUN="${RUN:-$RUNS/paper-5fold}"
WORK="$RUNS/int8-check"
mkdir -p "$RESULTS/bench"
rm -rf "$WORK"
# Fold 0's held-out pairs and 64 of its training images as PNG folders (the export CLI reads folders).
"$PY" - "$KVASIR" "$RUN/splits.json" "$WORK" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from polypseg.data.cache import build_cache

data, splits_path, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
fold = next(f for f in json.loads(splits_path.read_text())["folds"] if f["fold"] == 0)
image_size = json.loads(splits_path.with_name("config.json").read_text())["run"]["train"]["image_size"]
cache = build_cache(data, image_size, progress=False)
train = fold["train"] + fold.get("val", [])
calibration = [train[int(i)] for i in np.linspace(0, len(train) - 1, min(64, len(train)))]
for folder, stems, with_masks in ((work / "validate", fold["test"], True), (work / "calibrate", calibration, False)):
    (folder / "images").mkdir(parents=True)
    if with_masks:
        (folder / "masks").mkdir()
    subset = cache.subset(stems)
    for stem, image, mask in zip(subset.stems, subset.images, subset.masks):
        Image.fromarray(image).save(folder / "images" / f"{stem}.png")
        if with_masks:
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{stem}.png")
print(f"fold 0: {len(fold['test'])} held-out images to validate, {len(calibration)} training images to calibrate")
PY
polypseg export --model "$RUN/fold_0/best" --format onnx --int8 --calibration "$WORK/calibrate" \
  --calibration-count 64 --validate "$WORK/validate" --json "$RESULTS/bench/int8_dice.json"
