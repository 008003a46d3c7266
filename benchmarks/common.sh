# Settings shared by the measurement scripts (each sources this file). All can be set from the
# environment; tests/test_benchmarks.py points them at tiny data on the CPU to keep the scripts working.
#   KVASIR    training data: a dataset folder or a `polypseg data cache --out` file
#             (default: the 256 px cache that benchmarks/prepare_gpu_carry.sh writes into .gpucache/)
#   CVC       external-validation data, likewise (default: .gpucache/cvc-clinicdb-test62-256.npz)
#   DEVICE    auto | cuda | cpu (default auto)
#   FOLDS     folds of every CV run (default 5)
#   RUNS      where runs are trained; weights stay there (default /tmp/runs)
#   RESULTS   where the small result files go (default $OUT, the folder a GPU call brings back,
#             else /tmp/results)
#   SETS      extra config overrides for every training run, e.g. "--set train.epochs=1" (smoke tests)
#   PYTHON    the interpreter (default python3)
#   COMMIT    the commit measured (default: git rev-parse, when the checkout has its .git)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KVASIR="${KVASIR:-$REPO/.gpucache/kvasir-seg-256.npz}"
CVC="${CVC:-$REPO/.gpucache/cvc-clinicdb-test62-256.npz}"
DEVICE="${DEVICE:-auto}"
FOLDS="${FOLDS:-5}"
RUNS="${RUNS:-/tmp/runs}"
RESULTS="${RESULTS:-${OUT:-/tmp/results}}"
read -r -a SETS_ARRAY <<< "${SETS:-}"
PY="${PYTHON:-python3}"
COMMIT="${COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

polypseg() { "$PY" -m polypseg.cli.main "$@"; }

# Seconds since the epoch, with a fraction (no bc on the GPU image).
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The machine and software a result was measured with, one "key: value" per line.
environment() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $COMMIT"
  echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
  echo "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_tile|amx_bf16|amx_int8' | xargs)"
  "$PY" -c "import torch, polypseg; print(f'torch: {torch.__version__} (CUDA {torch.version.cuda})'); print(f'polypseg: {polypseg.__version__}')"
}

# copy_run RUN DEST: a CV run's small files (never weights or predictions) for docs/runs/.
# The list is polypseg.core.runs.RunDir.record_files: the one place that knows a run's layout.
copy_run() {
  "$PY" -c 'import sys; from polypseg.core.runs import RunDir; RunDir(sys.argv[1]).copy_record(sys.argv[2])' "$1" "$2"
}
