#!/usr/bin/env bash
# Training speed of the recipes on a GPU (the paper run's < 3 min and the strong run's < 10 min
# targets both depend on it). Each row is `polypseg bench-train`: the real training
# step (augmentation, bf16 forward/backward, fused optimizer, EMA) on random data on the GPU.
#   source benchmarks/gpu_env.sh && bash benchmarks/train_speed_gpu.sh
# Rows: paper; strong as defined (torch.compile); strong without compile; strong at batch 64.
# TRAIN_STEPS and TRAIN_WARMUP (default 50 and 10) set the repetitions, TRAIN_BENCH adds options; other settings: benchmarks/common.sh.
# Writes $RESULTS/bench/train_speed.md and one JSON per row beside it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# TRAIN_BENCH: extra bench-train options for every row (the CPU smoke test times one variant, no peak).
read -r -a TRAIN_BENCH_ARRAY <<< "${TRAIN_BENCH:-}"
DEST="$RESULTS/bench"
mkdir -p "$DEST"
rows=(
  "paper|--recipe paper"
  "strong|--recipe strong"
  "strong-eager|--recipe strong --set train.compile=false"
  "strong-b64|--recipe strong --batch-size 64"
)
{
  echo "# Training speed, $(date -u +%Y-%m-%dT%H:%MZ), commit $COMMIT"
  echo
} > "$DEST/train_speed.md"
header=yes
for row in "${rows[@]}"; do
  name="${row%%|*}"
  read -r -a options <<< "${row#*|}"
  polypseg bench-train --label "$name" "${options[@]}" "${SETS_ARRAY[@]}" "${TRAIN_BENCH_ARRAY[@]}" --device "$DEVICE" \
    --steps "${TRAIN_STEPS:-50}" --warmup "${TRAIN_WARMUP:-10}" --json "$DEST/train_speed_$name.json" --markdown > "$DEST/.row.md"
  if [[ $header == yes ]]; then cat "$DEST/.row.md"; header=no; else tail -n 1 "$DEST/.row.md"; fi >> "$DEST/train_speed.md"
done
rm -f "$DEST/.row.md"
cat "$DEST/train_speed.md"
