#!/usr/bin/env bash
# Grad-CAM throughput: the paper's U-Net/ResNet-34 at 256x256, target = logits inside the predicted
# mask, layer = last decoder block, bf16 autocast + channels_last, one forward+backward per batch.
# Issue target: 1000 heatmaps in under 10 s on an H100.
#
#   source benchmarks/gpu_env.sh && bash benchmarks/explain_speed.sh   # on the lent GPU machine
#   N=8 BATCH=4 DEVICE=cpu bash benchmarks/explain_speed.sh   # smoke test without a GPU
# N images (default 1000) in batches of BATCH (default 100); other settings: benchmarks/common.sh.
# The result line also goes to $RESULTS/bench/explain_speed.txt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mkdir -p "$RESULTS/bench"
N="${N:-1000}" BATCH="${BATCH:-100}" DEVICE="$DEVICE" "$PY" - <<'PY' | tee "$RESULTS/bench/explain_speed.txt"
import os
import time

import torch

from polypseg.explain import MaskedLogitSum, SegmentationGradCAM, autocast_for
from polypseg.models import create_model
from polypseg.transforms import normalize

from polypseg.devices import resolve_device

n, batch = int(os.environ["N"]), int(os.environ["BATCH"])
device = os.environ["DEVICE"]
if device == "auto":
    device = str(resolve_device("auto"))
if device.startswith("cuda") and not torch.cuda.is_available():
    raise SystemExit("CUDA is not available; run with DEVICE=cpu N=8 BATCH=4 for a smoke test")
torch.backends.cudnn.benchmark = True
model = create_model().eval().to(device)  # default: U-Net, ResNet-34, decoder (256, 128, 64, 32, 16)
if device.startswith("cuda"):
    model = model.to(memory_format=torch.channels_last)
generator = torch.Generator(device=device).manual_seed(0)
images = torch.randint(0, 256, (n, 3, 256, 256), dtype=torch.uint8, device=device, generator=generator)


def sync() -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


with SegmentationGradCAM(model) as cam:
    def run(count: int) -> float:
        checksum = 0.0
        for start in range(0, count, batch):
            x = normalize(images[start : start + batch])
            if device.startswith("cuda"):
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(device):
                heatmaps = cam(x, MaskedLogitSum(0.5))
            checksum += float(heatmaps.sum())  # forces completion of every batch
        return checksum

    run(min(n, 2 * batch))  # warm-up: cuDNN autotuning, allocator
    sync()
    start = time.perf_counter()
    run(n)
    sync()
    seconds = time.perf_counter() - start

name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
print(f"device: {name}; torch {torch.__version__}; batch {batch}; bf16 autocast: {device.startswith('cuda')}")
print(f"{n} heatmaps (256x256) in {seconds:.2f} s = {n / seconds:.1f} heatmaps/s")
PY
