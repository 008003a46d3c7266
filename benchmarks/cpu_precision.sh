#!/usr/bin/env bash
# Training, inference and Grad-CAM speed per precision on a CPU, side by side, one run.
#
#   bash benchmarks/cpu_precision.sh [CKPT|random]        # OUT_DIR=... (default: .)
#
# 1. bench-train, paper recipe: fp32 NCHW, fp32 channels-last, bf16 channels-last interleaved over
#    ROUNDS rounds of TRAIN_STEPS steps (speed-ups paired per round), with TFLOP/s and the fraction
#    of this CPU's measured bf16 matmul peak, and the predicted time of a fold of 30 epochs on 800 images;
# 2. bench-train, cpu recipe (the shipped model's): its predicted run time with progressive resizing;
# 3. bench --backend all at batch 1: torch fp32/bf16, onnxruntime fp32/int8, OpenVINO fp32/bf16/int8
#    (bf16 rows only where the CPU has native bf16; OpenVINO only where installed), REPEATS
#    repetitions in ROUNDS interleaved rounds;
#    (on a host whose speed drifts, benchmarks/speed_phases.py repeats 1 and 3 with a matmul probe
#    around every round and reports the rounds run in its fast phase)
# 4. bench-explain: EXPLAIN_IMAGES Grad-CAM heatmaps in fp32 and bf16 (and, with a trained CKPT,
#    their correlation), from EXPLAIN_DATA (default: the bundled sample), plus the forward-only
#    engines in EXPLAIN_ENGINES (e.g. openvino-bf16,openvino-int8; default: none).
# Pause any other torch job first (kill -STOP PID): 2 cores shared make every figure meaningless.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT="${1:-random}"
OUT_DIR="${OUT_DIR:-.}"
ROUNDS="${ROUNDS:-2}"
TRAIN_STEPS="${TRAIN_STEPS:-3}"  # per variant per round; on a CPU whose speed drifts, 1 step x many rounds pairs better
REPEATS="${REPEATS:-20}"
EXPLAIN_IMAGES="${EXPLAIN_IMAGES:-200}"
EXPLAIN_DATA="${EXPLAIN_DATA:-}"
EXPLAIN_ENGINES="${EXPLAIN_ENGINES:-}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, the commit the results name
export COLUMNS="${COLUMNS:-160}"  # rich's tables whole in the log, not folded to 80 columns
POLYPSEG="python3 -m polypseg.cli.main"
{
  echo "# CPU precision benchmarks, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores;" \
    "flags: $(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx512_bf16|amx_bf16|amx_tile|avx512_vnni|avx512f' | sort -u | xargs);" \
    "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "## 1. Training step, paper recipe (batch 16, 256 px)"
  $POLYPSEG bench-train --recipe paper --device cpu --steps "$TRAIN_STEPS" --warmup 2 --rounds "$ROUNDS" --train-images 800 \
    --json "$OUT_DIR/train_paper.json" --markdown
  echo
  echo "## 2. Training step, cpu recipe (progressive resizing 160 -> 256 px)"
  $POLYPSEG bench-train --recipe cpu --device cpu --variants recipe --steps 3 --warmup 2 --train-images 810 \
    --json "$OUT_DIR/train_cpu.json" --markdown
  echo
  echo "## 3. Inference, batch 1, 256 px"
  $POLYPSEG bench --model "$CKPT" --device cpu --backend all --batch-size 1 --warmup 5 --repeats "$REPEATS" --rounds "$ROUNDS" \
    --json "$OUT_DIR/infer_b1.json" --markdown
  echo
  echo "## 4. Grad-CAM, $EXPLAIN_IMAGES heatmaps at 256 px"
  $POLYPSEG bench-explain --model "$CKPT" --device cpu --images "$EXPLAIN_IMAGES" --batch-size 16 \
    ${EXPLAIN_DATA:+--data "$EXPLAIN_DATA"} ${EXPLAIN_ENGINES:+--engines "$EXPLAIN_ENGINES"} \
    --json "$OUT_DIR/explain.json" --markdown
  echo
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee "$OUT_DIR/cpu_precision.md"
