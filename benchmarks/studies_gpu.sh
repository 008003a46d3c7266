#!/usr/bin/env bash
# The skip-connection ablation and the external validation on the full datasets.
# On a GPU machine prepared with benchmarks/prepare_gpu_carry.sh (.whl and .gpucache copied along):
#   source benchmarks/gpu_env.sh && bash benchmarks/studies_gpu.sh
# Anywhere else, with the datasets themselves:
#   bash benchmarks/studies_gpu.sh --kvasir ../shared/datasets/kvasir-seg --cvc ../shared/datasets/cvc-clinicdb-test62
#
# 1. polypseg study skip-ablation on Kvasir-SEG: paper recipe, random encoder init, 5 folds, the
#    same seed and folds for both arms                                  -> RUNS/skip-ablation/
# 2. polypseg evaluate of both arms on CVC-ClinicDB-62, no retraining  -> RUNS/external-cvc62/
# 3. Small result files only (never weights) -> RESULTS/skip-ablation/ and RESULTS/external-cvc62/,
#    with the GPU, versions and wall times; copy them to docs/runs/ for docs/results.md.
#
# Options (defaults from benchmarks/common.sh, which also reads them from the environment):
# --kvasir PATH, --cvc PATH (dataset folders or `polypseg data cache --out` files; default the
# carried .gpucache/*-256.npz), --runs DIR, --results DIR, --folds 5, --recipe paper, --device auto,
# --set section.field=value (repeatable, passed to both arms). Rerunning resumes finished folds;
# a with-skips arm already trained in RUNS/skip-ablation/with-skips (e.g. by gpu_session.sh's paper
# step, the same settings) is reused, not retrained.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RECIPE="paper"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --kvasir) KVASIR="$2"; shift 2 ;;
    --cvc) CVC="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --results) RESULTS="$2"; shift 2 ;;
    --folds) FOLDS="$2"; shift 2 ;;
    --recipe) RECIPE="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --set) SETS_ARRAY+=(--set "$2"); shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -e "$KVASIR" ]] || { echo "error: --kvasir $KVASIR: not found (a dataset folder or a cache .npz)" >&2; exit 2; }
[[ -e "$CVC" ]] || { echo "error: --cvc $CVC: not found (a dataset folder or a cache .npz)" >&2; exit 2; }

started=$(date +%s)
polypseg study skip-ablation --data "$KVASIR" --out "$RUNS/skip-ablation" --recipe "$RECIPE" --folds "$FOLDS" \
  --encoder-weights none --device "$DEVICE" --no-progress --resume "${SETS_ARRAY[@]}"
ablation_s=$(( $(date +%s) - started ))

started=$(date +%s)
for arm in with-skips no-skips; do
  polypseg evaluate --model "$RUNS/skip-ablation/$arm" --data "$CVC" --out "$RUNS/external-cvc62/$arm" \
    --device "$DEVICE" --no-progress
done
external_s=$(( $(date +%s) - started ))

for arm in with-skips no-skips; do
  copy_run "$RUNS/skip-ablation/$arm" "$RESULTS/skip-ablation/$arm"
  mkdir -p "$RESULTS/external-cvc62/$arm"
  cp "$RUNS/external-cvc62/$arm"/external_*.{json,md} "$RESULTS/external-cvc62/$arm/"
done
cp "$RUNS/skip-ablation"/skip_ablation.{md,json} "$RESULTS/skip-ablation/"

{
  environment
  echo "command: bash benchmarks/studies_gpu.sh --folds $FOLDS --recipe $RECIPE ${SETS_ARRAY[*]}"
  echo "data: $KVASIR; external: $CVC"
  echo "skip ablation wall time (both arms, with Grad-CAM checks and reports; an arm finished earlier is reused): ${ablation_s} s"
  echo "external validation wall time (both arms): ${external_s} s"
} | tee "$RESULTS/skip-ablation/ENVIRONMENT.txt"
cp "$RESULTS/skip-ablation/ENVIRONMENT.txt" "$RESULTS/external-cvc62/ENVIRONMENT.txt"
echo "results: $RESULTS/skip-ablation/skip_ablation.md, $RESULTS/external-cvc62/*/external_*.md"
