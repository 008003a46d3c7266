#!/usr/bin/env bash
# Issue #7's measurement: the strong recipe, 5 folds, same splits as the paper-recipe run.
#   source benchmarks/gpu_env.sh && bash benchmarks/cv_strong_gpu.sh [path/to/paper-run/splits.json]
set -euo pipefail
RUN=${RUN:-/tmp/runs/strong-5fold}
SPLITS=${1:-docs/runs/paper-5fold/splits.json}
OUT_DIR=${OUT:-/tmp/out}/strong-5fold
mkdir -p "$RUN"
if [ -f "$SPLITS" ]; then cp "$SPLITS" "$RUN/splits.json"; fi  # same folds as the paper run
start=$(date +%s.%N)
python3 -m polypseg.cli.main cv --data .gpucache/kvasir-seg-256.npz --out "$RUN" --recipe strong --folds 5 --no-progress
end=$(date +%s.%N)
echo "wall time of the whole cv command: $(echo "$end - $start" | bc) s"
python3 -m polypseg.cli.main evaluate --model "$RUN" --data .gpucache/cvc-clinicdb-test62-256.npz --out "$RUN" || true
mkdir -p "$OUT_DIR"
cp "$RUN"/summary.json "$RUN"/summary.md "$RUN"/splits.json "$OUT_DIR"/
cp "$RUN"/external_* "$OUT_DIR"/ 2>/dev/null || true
