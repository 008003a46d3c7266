#!/usr/bin/env bash
# GPU inference speed at 256x256 (one command on the lent H100):
#   batch 1:   eager PyTorch (bf16 autocast, channels-last) vs torch.compile "reduce-overhead"
#              (CUDA graphs), measured in the same process;
#   batch 256: eager vs torch.compile "max-autotune" (slow to compile: several minutes once).
#
#   bash benchmarks/speed_gpu.sh [CKPT|random]
#
# Prints markdown tables for docs/benchmarks.md; writes bench_gpu_b1.json and bench_gpu_b256.json
# in $OUT_DIR (default: .). Targets: batch-1 median <= 0.7 ms, batch-256 >= 12000 images/s.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
CKPT="${1:-random}"
OUT_DIR="${OUT_DIR:-.}"
mkdir -p "$OUT_DIR"
POLYPSEG="python3 -m polypseg.cli.main"
# Inductor freezing: weights become constants of the inference graph (BatchNorm folded into the
# convolutions, bf16 weight casts done once). Set TORCHINDUCTOR_FREEZING=0 to compare without.
export TORCHINDUCTOR_FREEZING="${TORCHINDUCTOR_FREEZING:-1}"

echo "# GPU inference speed, $(date -u +%Y-%m-%dT%H:%MZ)"
python3 - <<'PY'
import torch
print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
PY
echo
echo "## batch 1"
$POLYPSEG bench --model "$CKPT" --device cuda --backend torch --batch-size 1 --compile reduce-overhead \
  --compare-eager --warmup 50 --repeats 1000 --json "$OUT_DIR/bench_gpu_b1.json" --markdown
echo
echo "## batch 256"
$POLYPSEG bench --model "$CKPT" --device cuda --backend torch --batch-size 256 --compile max-autotune \
  --compare-eager --warmup 10 --repeats 100 --json "$OUT_DIR/bench_gpu_b256.json" --markdown
