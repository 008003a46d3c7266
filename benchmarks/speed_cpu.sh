#!/usr/bin/env bash
# CPU inference speed: eager PyTorch fp32 vs onnxruntime fp32 vs onnxruntime int8, side by side,
# then (given a trained checkpoint and a labelled dataset) the Dice change of int8 against fp32.
#
#   bash benchmarks/speed_cpu.sh [CKPT|random] [VALIDATE_DIR] [CALIBRATION_DIR]
#
# CKPT: a checkpoint or run folder; "random" (default) is the default U-Net/ResNet-34 with random
#   weights, for speed only.
# VALIDATE_DIR: labelled dataset (images/ + masks/) for the Dice change; default Kvasir-SEG.
#   Use images the model was not trained on (e.g. the PraNet test 100).
# CALIBRATION_DIR: images for int8 calibration (no labels used); default VALIDATE_DIR/images.
# Writes bench_cpu_b1.json, bench_cpu_b8.json and int8_dice.json in $OUT_DIR (default: .).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
CKPT="${1:-random}"
VALIDATE="${2:-$PWD/../shared/datasets/kvasir-seg}"
CALIBRATION="${3:-$VALIDATE/images}"
OUT_DIR="${OUT_DIR:-.}"
mkdir -p "$OUT_DIR"
POLYPSEG="python3 -m polypseg.cli.main"

echo "# CPU inference speed, $(date -u +%Y-%m-%dT%H:%MZ)"
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
CALIBRATE=()
if [ -d "$CALIBRATION" ]; then CALIBRATE=(--calibration "$CALIBRATION"); fi
for BATCH in 1 8; do
  echo "## batch $BATCH, 256x256"
  $POLYPSEG bench --model "$CKPT" --device cpu --backend all --batch-size "$BATCH" \
    --warmup 5 --repeats 30 "${CALIBRATE[@]}" --json "$OUT_DIR/bench_cpu_b$BATCH.json" --markdown
  echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
done

if [ "$CKPT" != "random" ] && [ -d "$VALIDATE/masks" ]; then
  echo "## int8 vs fp32 Dice on $VALIDATE"
  $POLYPSEG export --model "$CKPT" --format onnx --int8 "${CALIBRATE[@]}" --calibration-count 64 \
    --validate "$VALIDATE" --json "$OUT_DIR/int8_dice.json"
fi
