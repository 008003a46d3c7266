"""Dice of one model on a labelled folder per CPU backend, at each image's original size.

    python benchmarks/backend_dice.py EXPORT_DIR/NAME.onnx CHECKPOINT DATA [OUT.json]

EXPORT_DIR holds NAME.onnx and NAME.int8.onnx from `polypseg export --int8` (calibrated on
training images); DATA is images/ + masks/. Prints each backend's mean Dice and its change against
onnxruntime fp32 (threshold 0.5). The CPU default backend is the fastest whose change is <= 0.005.
"""

import json
import sys

import numpy as np
import torch

from polypseg.data.images import read_mask
from polypseg.data.pairing import index_dataset
from polypseg.inference.predictor import Predictor
from polypseg.metrics.segmentation import dice_score

onnx, checkpoint, data = sys.argv[1], sys.argv[2], sys.argv[3]
int8 = onnx.removesuffix(".onnx") + ".int8.onnx"
samples = index_dataset(data).samples
fp32 = Predictor.from_onnx(onnx)
cands = {
    "onnxruntime-fp32": fp32,
    "onnxruntime-int8": Predictor.from_onnx(int8),
    "openvino-fp32": Predictor.from_openvino(onnx, precision="fp32"),
    "openvino-bf16": Predictor.from_openvino(onnx, precision="bf16"),
    "openvino-int8": Predictor.from_openvino(int8, precision="auto"),
    "torch-bf16": Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch", precision="bf16"),
}
scores = {k: [] for k, v in cands.items() if v is not None}
for s in samples:
    truth = torch.from_numpy(np.asarray(read_mask(s.mask)))
    for name in scores:
        r = cands[name].predict_one(s.image)
        scores[name].append(float(dice_score(torch.from_numpy(np.asarray(r.mask))[None], truth[None])))
ref = np.mean(scores["onnxruntime-fp32"])
out = {k: {"dice": float(np.mean(v)), "change_vs_fp32": float(np.mean(v) - ref)} for k, v in scores.items()}
print(json.dumps(out, indent=1))
if len(sys.argv) > 4:
    with open(sys.argv[4], "w") as f:
        json.dump(out, f, indent=1)
