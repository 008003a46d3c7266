#!/usr/bin/env bash
# The paper recipe, 5 folds on all 1000 Kvasir-SEG images, random-init encoder, with the wall time
# of the whole command (target: under 3 minutes on one GPU).
# On a GPU machine prepared with benchmarks/prepare_gpu_carry.sh (.whl and .gpucache copied along):
#   source benchmarks/gpu_env.sh && bash benchmarks/cv_paper_gpu.sh [extra cv options]
# Settings: benchmarks/common.sh. RUN (default $RUNS/paper-5fold) is resumed if it exists.
# Small result files -> $RESULTS/paper-5fold/ (copy them to docs/runs/paper-5fold/).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RUN="${RUN:-$RUNS/paper-5fold}"
DEST="$RESULTS/paper-5fold"
resumed=no; [[ -f "$RUN/config.json" ]] && resumed=yes
start=$(now)
polypseg cv --data "$KVASIR" --out "$RUN" --recipe paper --folds "$FOLDS" --device "$DEVICE" --no-progress \
  --resume "${SETS_ARRAY[@]}" "$@"
wall=$(elapsed "$start")
echo "wall time of the whole cv command: $wall s"
copy_run "$RUN" "$DEST"
{
  environment
  echo "command: bash benchmarks/cv_paper_gpu.sh $* (data: $KVASIR; SETS: ${SETS:-none})"
  echo "wall time of the cv command: $wall s$([[ $resumed == yes ]] && echo ' (this invocation resumed an earlier one: not the whole run)')"
} | tee "$DEST/ENVIRONMENT.txt"
