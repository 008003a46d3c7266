#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md as one command, run call after call on the same
# machine, in priority order, each call within BUDGET_S seconds (for machines that limit a command's time).
#
# Here, once:        bash benchmarks/prepare_gpu_carry.sh
# Before the calls:  bash benchmarks/weights_aside.sh out   (a smaller copy to send; "back" after
#                    the last call, before any commit)
# On the GPU machine, with .whl and .gpucache copied along, the same command for every call:
#   source benchmarks/gpu_env.sh && COMMIT=<sha> bash benchmarks/gpu_session.sh
# Back on your machine: tar -xzf results.tar.gz -C docs/runs    (then update the docs)
#
# A step done in an earlier call on the same machine is skipped, an interrupted CV run resumes, and a
# step whose time estimate does not fit before the deadline (BUDGET_S seconds after the start,
# default 540) is left for the next call, unless it would be the call's first step. After each
# step, all small result files are packed into one archive, $OUT/results.tar.gz, beside the log
# $OUT/session.log. A failed step does not stop the others.
#
# STEPS (default: train-speed paper explain-speed speed-b1 int8-check skip-ablation speed-b256 levers):
#   train-speed    train_speed_gpu.sh: training images/s of the recipes (predicts every run's time)
#   paper          cv_paper_gpu.sh into RUNS/skip-ablation/with-skips (the ablation's first arm)
#   explain-speed  explain_speed.sh: 1000 Grad-CAM heatmaps
#   speed-b1       speed_gpu.sh at batch 1; speed-b256 at batch 256 (max-autotune compiles for minutes)
#   int8-check     int8_check.sh: int8 vs fp32 Dice with the paper run's fold-0 model (on the CPU)
#   skip-ablation  studies_gpu.sh: the no-skips arm, then both arms on CVC-ClinicDB-62
#   levers         strong_levers_gpu.sh, one step per lever (LEVERS, default all)
#   strong-5fold   cv_strong_gpu.sh: only after the lever table has fixed the recipe, so never by default
# Other settings: benchmarks/common.sh. SMOKE=1 shrinks the timing steps for a CPU smoke test.
# BUDGET_S=inf never leaves a step for later (the CPU smoke test: its speed must not decide what runs).
# PLAN=1 runs nothing: it prints what a call would do, each step taking its ESTIMATE on a simulated
# clock that starts at 0 (steps done in an earlier call are still skipped), and writes no state.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"
OUT="${OUT:-/tmp/out}"
export RESULTS="$RUNS/results"  # packed into $OUT after each step; survives between calls on a warm machine
export RUNS DEVICE FOLDS KVASIR CVC SETS PYTHON="$PY" COMMIT
STATE="$RUNS/.session"
BUDGET_S="${BUDGET_S:-540}"
STEPS="${STEPS:-train-speed paper explain-speed speed-b1 int8-check skip-ablation speed-b256 levers}"
LEVERS="${LEVERS:-strong baseline-300ep no-ema no-crop no-tta epochs-100 batch-64-lr-4e-3 scse unetplusplus tversky}"
PLAN="${PLAN:-0}"
if [[ "$BUDGET_S" != inf ]] && ! [[ "$BUDGET_S" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "error: BUDGET_S=$BUDGET_S: seconds (a number) or inf" >&2; exit 2
fi
# The session clock: real seconds, or under PLAN=1 a simulated one advanced by each step's estimate.
simulated=0
clock() { if [[ "$PLAN" == 1 ]]; then echo "$simulated"; else now; fi; }
since() { awk -v a="$1" -v b="$(clock)" 'BEGIN { printf "%.1f", b - a }'; }
started=$(clock)
if [[ "$PLAN" != 1 ]]; then
  mkdir -p "$OUT" "$RESULTS" "$STATE"
  exec > >(tee -a "$OUT/session.log") 2>&1
fi

# Seconds each step is expected to take on one H100 (guesses until measured; update them then).
declare -A ESTIMATE=([train-speed]=150 [paper]=240 [explain-speed]=60 [speed-b1]=180 [int8-check]=120 [skip-ablation]=300 [speed-b256]=420 [levers]=200 [strong-5fold]=600)
if [[ "${SMOKE:-0}" == 1 ]]; then
  export N=4 BATCH=2 COMPILE=none WARMUP=1 REPEATS=2 TRAIN_STEPS=2 TRAIN_WARMUP=1 TRAIN_BENCH="--variants recipe --no-peak"
  SPEED_B256=2
else
  SPEED_B256=256
fi

pack() {
  [[ "$PLAN" == 1 ]] && return
  tar -czf "$OUT/results.tar.gz.tmp" -C "$RESULTS" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

# step NAME ESTIMATE_KEY COMMAND...: run COMMAND unless done already or out of time.
step() {
  local name="$1" estimate="${ESTIMATE[$2]}" t0
  shift 2
  if [[ -f "$STATE/$name.done" ]]; then echo "== $name: done in an earlier call"; return; fi
  local spent; spent=$(since "$started")
  # The first step of a call always starts: one longer than a call resumes in the next (CV runs resume).
  if [[ -n "$ran_one" && "$BUDGET_S" != inf ]] && awk -v s="$spent" -v e="$estimate" -v b="$BUDGET_S" 'BEGIN { exit !(s + e > b) }'; then
    echo "== $name: left for the next call (${spent} s spent, about ${estimate} s needed, budget ${BUDGET_S} s)"
    return
  fi
  ran_one=yes
  if [[ "$PLAN" == 1 ]]; then
    echo "== $name: would start (${spent} s spent, about ${estimate} s needed): $*"
    simulated=$(awk -v a="$simulated" -v e="$estimate" 'BEGIN { print a + e }')
    return
  fi
  echo "== $name: start (${spent} s spent)"
  t0=$(now)
  # A failed step is reported and the next one still runs (most steps do not depend on each other).
  if "$@"; then
    echo "$(elapsed "$t0")" > "$STATE/$name.done"
    echo "== $name: done in $(cat "$STATE/$name.done") s"
  else
    echo "== $name: FAILED (exit $?) after $(elapsed "$t0") s"
    failed+=("$name")
  fi
  pack
}
failed=()
ran_one=

echo "# gpu_session $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $COMMIT, steps: $STEPS"
for name in $STEPS; do
  case "$name" in
    train-speed) step train-speed train-speed bash "$HERE/train_speed_gpu.sh" ;;
    paper) step paper paper env RUN="$RUNS/skip-ablation/with-skips" bash "$HERE/cv_paper_gpu.sh" ;;
    explain-speed) step explain-speed explain-speed bash "$HERE/explain_speed.sh" ;;
    speed-b1) step speed-b1 speed-b1 env BATCHES=1 bash "$HERE/speed_gpu.sh" ;;
    int8-check) step int8-check int8-check env RUN="$RUNS/skip-ablation/with-skips" bash "$HERE/int8_check.sh" ;;
    speed-b256) step speed-b256 speed-b256 env BATCHES="$SPEED_B256" bash "$HERE/speed_gpu.sh" ;;
    skip-ablation) step skip-ablation skip-ablation bash "$HERE/studies_gpu.sh" ;;
    levers) for lever in $LEVERS; do step "lever-$lever" levers bash "$HERE/strong_levers_gpu.sh" "$lever"; done ;;
    strong-5fold) step strong-5fold strong-5fold bash "$HERE/cv_strong_gpu.sh" ;;
    *) echo "error: unknown step '$name' (see the header of $0)" >&2; exit 2 ;;
  esac
done
pack
if [[ "$PLAN" == 1 ]]; then echo "# gpu_session plan: about $(since "$started") s of estimated work (nothing was run)"; exit 0; fi
echo "# gpu_session finished its part in $(since "$started") s; results: $OUT/results.tar.gz"
if (( ${#failed[@]} )); then echo "# failed steps: ${failed[*]}"; exit 1; fi
