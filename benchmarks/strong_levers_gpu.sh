#!/usr/bin/env bash
# The strong recipe's lever study: each lever's effect measured one at a time on fold 0 only (honest
# selection: the other folds are not looked at until the recipe is fixed).
#   source benchmarks/gpu_env.sh && bash benchmarks/strong_levers_gpu.sh [LEVER ...]
# With no LEVER, all of them in the order below. SPLITS (default docs/runs/paper-5fold/splits.json,
# when present) gives the paper run's folds. A lever's run is resumed if it exists. Other settings:
# benchmarks/common.sh. Appends one markdown row per lever (name, Dice and IoU of fold 0 at 0.5,
# minutes) to $RESULTS/strong-levers/levers.md and copies each run's small files beside it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SPLITS="${SPLITS:-$REPO/docs/runs/paper-5fold/splits.json}"
LEVER_NAMES=(strong baseline-300ep no-ema no-crop no-tta epochs-100 batch-64-lr-4e-3 scse unetplusplus tversky)
declare -A LEVERS=(
  [strong]="--recipe strong"
  [baseline-300ep]="--recipe strong --set train.epochs=300 --set train.ema_decay=0 --set train.tta_flip=false --set train.augment.crop_p=0 --set train.compile=false"
  [no-ema]="--recipe strong --set train.ema_decay=0"
  [no-crop]="--recipe strong --set train.augment.crop_p=0"
  [no-tta]="--recipe strong --set train.tta_flip=false"
  [epochs-100]="--recipe strong --set train.epochs=100"
  [batch-64-lr-4e-3]="--recipe strong --batch-size 64 --lr 4e-3"
  [scse]="--recipe strong --set model.decoder_attention=scse"
  [unetplusplus]="--recipe strong --set model.arch=unetplusplus"
  [tversky]="--recipe strong --loss tversky"
)
(( $# )) && LEVER_NAMES=("$@")
DEST="$RESULTS/strong-levers"
mkdir -p "$DEST"
[[ -f "$DEST/levers.md" ]] || printf '| lever | Dice fold 0 | IoU fold 0 | minutes |\n|---|---|---|---|\n' > "$DEST/levers.md"
for name in "${LEVER_NAMES[@]}"; do
  [[ -n "${LEVERS[$name]:-}" ]] || { echo "error: unknown lever '$name'; choose from: ${!LEVERS[*]}" >&2; exit 2; }
  run="$RUNS/levers/$name"
  mkdir -p "$run"
  [[ -f "$SPLITS" && ! -f "$run/splits.json" ]] && cp "$SPLITS" "$run/splits.json"
  start=$(now)
  read -r -a lever_args <<< "${LEVERS[$name]}"
  polypseg cv --data "$KVASIR" --out "$run" --folds "$FOLDS" --only-fold 0 --no-explain --no-progress \
    --device "$DEVICE" --resume "${lever_args[@]}" "${SETS_ARRAY[@]}" 2>&1 | tee "$run.log"
  minutes=$(awk -v s="$(elapsed "$start")" 'BEGIN { printf "%.1f", s / 60 }')
  "$PY" - "$run" "$name" "$minutes" <<'PY' | tee -a "$DEST/levers.md"
import json, sys
run, name, minutes = sys.argv[1], sys.argv[2], sys.argv[3]
fold = json.load(open(f"{run}/fold_0/metrics.json"))["at"]["0.5"]
print(f"| {name} | {fold['dice']:.4f} | {fold['iou']:.4f} | {minutes} |")
PY
  copy_run "$run" "$DEST/$name"
done
environment > "$DEST/ENVIRONMENT.txt"
