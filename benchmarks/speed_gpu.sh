#!/usr/bin/env bash
# GPU inference speed at 256x256, one command:
#   batch 1:   eager PyTorch (bf16 autocast, channels-last) vs torch.compile "reduce-overhead"
#              (CUDA graphs), measured in the same process;
#   batch 256: eager vs torch.compile "max-autotune" (slow to compile: several minutes once).
#
#   source benchmarks/gpu_env.sh && bash benchmarks/speed_gpu.sh [CKPT|random]
#
# BATCHES (default "1 256") picks the batch sizes; COMPILE overrides the compile mode of each
# (none skips the eager comparison); WARMUP and REPEATS override the repetitions. Other settings:
# benchmarks/common.sh. Prints markdown tables for docs/benchmarks.md and writes
# $RESULTS/bench/bench_gpu_b<N>.json. Targets: batch-1 median <= 0.7 ms, batch-256 >= 12000 images/s.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CKPT="${1:-random}"
mkdir -p "$RESULTS/bench"
# Inductor freezing: weights become constants of the inference graph (BatchNorm folded into the
# convolutions, bf16 weight casts done once). Set TORCHINDUCTOR_FREEZING=0 to compare without.
export TORCHINDUCTOR_FREEZING="${TORCHINDUCTOR_FREEZING:-1}"

echo "# inference speed, $(date -u +%Y-%m-%dT%H:%MZ), commit $COMMIT"
"$PY" -c "import torch; print('#', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())"
for batch in ${BATCHES:-1 256}; do
  if [[ $batch == 1 ]]; then mode=reduce-overhead warmup=50 repeats=1000; else mode=max-autotune warmup=10 repeats=100; fi
  mode="${COMPILE:-$mode}"
  compare=(); [[ $mode != none ]] && compare=(--compare-eager)
  echo
  echo "## batch $batch, torch.compile $mode"
  polypseg bench --model "$CKPT" --device "$DEVICE" --backend torch --batch-size "$batch" --compile "$mode" \
    "${compare[@]}" --warmup "${WARMUP:-$warmup}" --repeats "${REPEATS:-$repeats}" \
    --json "$RESULTS/bench/bench_gpu_b$batch.json" --markdown
done
