#!/usr/bin/env bash
# The Dice change of every CPU engine against fp32 on a trained model: export the model
# (ONNX fp32 + static int8 calibrated on 64 of its own training images, validated on its test
# images), then score each engine on the test images at their original size.
#   RUN=~/polypseg-runs/ship-cpu-v2 MODEL=src/polypseg/models/weights/kvasir-unet-r34 \
#     DATA=../shared/datasets/kvasir-seg RESULTS=docs/runs/X bash benchmarks/backend_dice.sh
# RUN is the model's `polypseg train` folder: its split.json names the training and test images.
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${RUN:?set RUN to the polypseg train folder of the model}" "${MODEL:?set MODEL to the checkpoint to export}"
DATA="${DATA:-$REPO/../shared/datasets/kvasir-seg}"
NAME="$(basename "$MODEL")"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/calib" "$WORK/test/images" "$WORK/test/masks" "$RESULTS"

# Folders of links: 64 training images to calibrate on, the test pairs to validate and score on.
"$PY" - "$RUN" "$DATA" "$WORK" <<'EOF'
import sys
from pathlib import Path

from polypseg.data.pairing import index_dataset
from polypseg.core.runs import RunDir

run, data, work = RunDir(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
split = run.read_split()
samples = {s.stem: s for s in index_dataset(data).samples}
for stem in split["train"][:64]:
    (work / "calib" / samples[stem].image.name).symlink_to(samples[stem].image.resolve())
for stem in split["test"]:
    (work / "test" / "images" / samples[stem].image.name).symlink_to(samples[stem].image.resolve())
    (work / "test" / "masks" / samples[stem].mask.name).symlink_to(samples[stem].mask.resolve())
EOF
environment > "$RESULTS/backend_dice_$NAME.env.txt"
polypseg export --model "$MODEL" --format onnx --out "$WORK/export/$NAME.onnx" --int8 \
  --calibration "$WORK/calib" --calibration-count 64 --validate "$WORK/test" \
  2>&1 | tee "$RESULTS/export_int8_$NAME.log"
"$PY" "$REPO/benchmarks/backend_dice.py" "$WORK/export/$NAME.onnx" "$MODEL" "$WORK/test" "$RESULTS/backend_dice_$NAME.json"
