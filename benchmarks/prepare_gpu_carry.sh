#!/usr/bin/env bash
# Prepare what a GPU machine without network access needs: the wheels it lacks and a compact
# preprocessed data cache (the raw datasets stay here). Run here, once, from the repo root:
#   bash benchmarks/prepare_gpu_carry.sh
# Then copy ".whl" and ".gpucache" (about 45 MB together) along with the work tree to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/datasets}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
EXCLUDE="$(git rev-parse --git-dir)/info/exclude"
mkdir -p "$(dirname "$EXCLUDE")"
for ignored in /.whl/ /.gpucache/; do
  grep -qxF "$ignored" "$EXCLUDE" 2>/dev/null || echo "$ignored" >> "$EXCLUDE"
done
mkdir -p .whl .gpucache
# The GPU image has torch, timm, safetensors, huggingface_hub, typer, rich, matplotlib, onnx(runtime):
# only segmentation-models-pytorch is missing (a pure-Python wheel).
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "segmentation-models-pytorch==0.6.0"
"${PYTHON:-python3}" -m polypseg.cli.main data cache "$DATA/kvasir-seg" --size 256 --out .gpucache/kvasir-seg-256.npz
"${PYTHON:-python3}" -m polypseg.cli.main data cache "$DATA/cvc-clinicdb-test62" --size 256 --out .gpucache/cvc-clinicdb-test62-256.npz
du -sh .whl .gpucache
