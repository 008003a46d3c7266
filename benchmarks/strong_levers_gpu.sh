#!/usr/bin/env bash
# Issue #7's lever study: each lever's effect measured one at a time on fold 0 only (honest
# selection: the other folds are not looked at until the recipe is fixed).
#   source benchmarks/gpu_env.sh && bash benchmarks/strong_levers_gpu.sh [splits.json]
# Prints one markdown row per lever: name, Dice, IoU (fold 0 at 0.5), minutes.
set -euo pipefail
SPLITS=${1:-docs/runs/paper-5fold/splits.json}
ROOT=${ROOT:-/tmp/runs/levers}
declare -A LEVERS=(
  [baseline-300ep]="--recipe strong --set train.epochs=300 --set train.ema_decay=0 --set train.tta_flip=false --set train.augment.crop_p=0 --set train.compile=false"
  [strong]="--recipe strong"
  [no-ema]="--recipe strong --set train.ema_decay=0"
  [no-crop]="--recipe strong --set train.augment.crop_p=0"
  [no-tta]="--recipe strong --set train.tta_flip=false"
  [epochs-100]="--recipe strong --set train.epochs=100"
  [batch-64-lr-4e-3]="--recipe strong --batch-size 64 --lr 4e-3"
)
echo "| lever | Dice fold 0 | IoU fold 0 | minutes |"
echo "|---|---|---|---|"
for name in "${!LEVERS[@]}"; do
  run="$ROOT/$name"; mkdir -p "$run"; [ -f "$SPLITS" ] && cp "$SPLITS" "$run/splits.json"
  start=$(date +%s)
  # shellcheck disable=SC2086
  python3 -m polypseg.cli.main cv --data .gpucache/kvasir-seg-256.npz --out "$run" --folds 5 --only-fold 0 \
    --no-explain --no-progress ${LEVERS[$name]} > "$run.log" 2>&1
  minutes=$(echo "($(date +%s) - $start) / 60" | bc -l)
  python3 - "$run" "$name" "$minutes" <<'PY'
import json, sys
run, name, minutes = sys.argv[1], sys.argv[2], float(sys.argv[3])
fold = json.load(open(f"{run}/fold_0/metrics.json"))["at"]["0.5"]
print(f"| {name} | {fold['dice']:.4f} | {fold['iou']:.4f} | {minutes:.1f} |")
PY
done
