#!/usr/bin/env bash
# Issue #2's measurement: the paper recipe, 5 folds on all 1000 Kvasir-SEG images, random-init
# encoder (no ImageNet weights can be had here), with the wall time of the whole command.
# On the lent H100 (after benchmarks/prepare_gpu_carry.sh here; carry .whl and .gpucache):
#   source benchmarks/gpu_env.sh && bash benchmarks/cv_paper_gpu.sh
# Small result files go to $OUT/paper-5fold (copy them to docs/runs/paper-5fold/).
set -euo pipefail
RUN=${RUN:-/tmp/runs/paper-5fold}
OUT_DIR=${OUT:-/tmp/out}/paper-5fold
start=$(date +%s.%N)
python3 -m polypseg.cli.main cv --data .gpucache/kvasir-seg-256.npz --out "$RUN" --recipe paper --folds 5 --no-progress "$@"
end=$(date +%s.%N)
echo "wall time of the whole cv command: $(echo "$end - $start" | bc) s"
mkdir -p "$OUT_DIR"
cp "$RUN"/summary.json "$RUN"/summary.md "$RUN"/splits.json "$OUT_DIR"/
