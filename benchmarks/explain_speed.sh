#!/usr/bin/env bash
# Grad-CAM throughput: the paper's U-Net/ResNet-34 at 256x256, target = logits inside the predicted
# mask, layer = last decoder block, one forward+backward per batch, through `polypseg bench-explain`
# (the product's own Grad-CAM driver) at the `auto` precision (bf16 + channels-last on a GPU).
# Target: 1000 heatmaps in under 10 s on one GPU.
#
#   source benchmarks/gpu_env.sh && bash benchmarks/explain_speed.sh   # on a GPU machine
#   N=8 BATCH=4 DEVICE=cpu bash benchmarks/explain_speed.sh   # smoke test without a GPU
# N images (default 1000) in batches of BATCH (default 100); other settings: benchmarks/common.sh.
# The table also goes to $RESULTS/bench/explain_speed.txt (and the rows to explain_speed.json).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mkdir -p "$RESULTS/bench"
polypseg bench-explain --model random --images "${N:-1000}" --batch-size "${BATCH:-100}" --precisions auto \
  --device "$DEVICE" --json "$RESULTS/bench/explain_speed.json" --markdown | tee "$RESULTS/bench/explain_speed.txt"
