#!/usr/bin/env bash
# The strong recipe's measurement (target: Dice >= 0.92 in under 10 minutes on one GPU): 5 folds, same splits as the paper-recipe run, then
# its fold ensemble on CVC-ClinicDB-62 without retraining. Run it once the lever study has fixed
# the recipe (strong_levers_gpu.sh), never to choose it.
#   source benchmarks/gpu_env.sh && bash benchmarks/cv_strong_gpu.sh [path/to/paper-run/splits.json]
# Settings: benchmarks/common.sh. RUN (default $RUNS/strong-5fold) is resumed if it exists.
# Small result files -> $RESULTS/strong-5fold/ (copy them to docs/runs/strong-5fold/).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RUN="${RUN:-$RUNS/strong-5fold}"
SPLITS="${1:-$REPO/docs/runs/paper-5fold/splits.json}"
DEST="$RESULTS/strong-5fold"
mkdir -p "$RUN" "$DEST"
# The paper run's test folds (its inner validation part is redrawn for this recipe's val_fraction).
[[ -f "$SPLITS" && ! -f "$RUN/splits.json" ]] && cp "$SPLITS" "$RUN/splits.json"
resumed=no; [[ -f "$RUN/config.json" ]] && resumed=yes
start=$(now)
polypseg cv --data "$KVASIR" --out "$RUN" --recipe strong --folds "$FOLDS" --device "$DEVICE" --no-progress \
  --resume "${SETS_ARRAY[@]}"
wall=$(elapsed "$start")
echo "wall time of the whole cv command: $wall s"
polypseg evaluate --model "$RUN" --data "$CVC" --out "$RUN/external" --device "$DEVICE" --no-progress
copy_run "$RUN" "$DEST"
cp "$RUN"/external/external_*.{json,md} "$DEST"/
{
  environment
  echo "command: bash benchmarks/cv_strong_gpu.sh $* (data: $KVASIR; external: $CVC; SETS: ${SETS:-none})"
  echo "wall time of the cv command: $wall s$([[ $resumed == yes ]] && echo ' (this invocation resumed an earlier one: not the whole run)')"
} | tee "$DEST/ENVIRONMENT.txt"
