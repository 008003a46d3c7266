#!/usr/bin/env bash
# Does bf16 training on the CPU reach the accuracy of fp32? Fold 0 of the paper recipe,
# a few epochs at 256 px, fp32 and bf16 with the same seed and split, and bf16 with other seeds
# on the same split to measure the seed-to-seed spread that the fp32-bf16 gap is judged against.
#
#   bash benchmarks/cpu_parity.sh            # RUNS=~/polypseg-runs/cpu-parity OUT_DIR=docs/runs/cpu-parity
#
# Every run is `polypseg cv --only-fold 0` (800 training images, of which 80 inner validation;
# scored on the fold's 200 held-out images). The seed-0 fp32 run writes splits.json; every other
# run gets a copy before it starts, so only the training seed (init, batch order, augmentation)
# changes. Finished runs are skipped and an interrupted one resumes, so rerunning continues.
# Then OUT_DIR gets each run's small files, parity.md (table) and curves.png (both loss curves).
# Pause any other torch job first (kill -STOP PID): it only changes the time, not the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/datasets/kvasir-seg}"
RUNS="${RUNS:-$HOME/polypseg-runs/cpu-parity}"
OUT_DIR="${OUT_DIR:-docs/runs/cpu-parity}"
EPOCHS="${EPOCHS:-4}"
BF16_SEEDS="${BF16_SEEDS:-0 1 2}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, the commit the results name
POLYPSEG="python3 -m polypseg.cli.main"
mkdir -p "$RUNS" "$OUT_DIR"

run() {  # run NAME PRECISION SEED
  local dir="$RUNS/$1" start
  if [[ -f "$dir/fold_0/metrics.json" ]]; then echo "== $1: done earlier"; return; fi
  if [[ "$1" != fp32-seed0 && ! -f "$dir/splits.json" ]]; then
    mkdir -p "$dir" && cp "$RUNS/fp32-seed0/splits.json" "$dir/splits.json"
  fi
  local resume=(); [[ -f "$dir/config.json" ]] && resume=(--resume)
  echo "== $1: $2, seed $3, $EPOCHS epochs"
  start=$(date +%s)
  $POLYPSEG cv --data "$DATA" --out "$dir" --recipe paper --epochs "$EPOCHS" --only-fold 0 \
    --precision "$2" --seed "$3" --no-explain --no-progress "${resume[@]}"
  echo "$(( $(date +%s) - start ))" > "$dir/wall_seconds.txt"
}

run fp32-seed0 fp32 0
for seed in $BF16_SEEDS; do run "bf16-seed$seed" bf16 "$seed"; done

RUNS="$RUNS" OUT_DIR="$OUT_DIR" CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; flags: $(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx512_bf16|amx_bf16|avx512f' | sort -u | xargs)" \
  COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" python3 - <<'PY'
import json
import os
import shutil
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

runs, out = Path(os.environ["RUNS"]), Path(os.environ["OUT_DIR"])
rows = []
fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(10, 4))
for run in sorted(p for p in runs.iterdir() if (p / "fold_0" / "metrics.json").is_file()):
    metrics = json.loads((run / "fold_0" / "metrics.json").read_text())
    history = json.loads((run / "fold_0" / "history.json").read_text())
    epochs = history["epochs"] if isinstance(history, dict) else history
    at_half = metrics["at"]["0.5"]
    rows.append((run.name, at_half["dice"], at_half["iou"], epochs[-1]["train_loss"], (run / "wall_seconds.txt").read_text().strip() if (run / "wall_seconds.txt").is_file() else "?"))
    style = "-" if run.name.startswith("fp32") else "--"
    x = [e["epoch"] for e in epochs]
    loss_ax.plot(x, [e["train_loss"] for e in epochs], style, marker="o", label=f"{run.name} train")
    loss_ax.plot(x, [e["val_loss"] for e in epochs], style, marker="x", alpha=0.6, label=f"{run.name} val")
    dice_ax.plot(x, [e["val_dice"] for e in epochs], style, marker="o", label=run.name)
    dest = out / run.name
    (dest / "fold_0").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "splits.json", "wall_seconds.txt"):
        if (run / name).is_file():
            shutil.copy(run / name, dest / name)
    for name in ("history.json", "metrics.json"):
        shutil.copy(run / "fold_0" / name, dest / "fold_0" / name)
loss_ax.set(xlabel="epoch", ylabel="Dice loss", title="loss per epoch (fold 0)")
dice_ax.set(xlabel="epoch", ylabel="inner-validation Dice", title="inner-validation Dice")
loss_ax.legend(fontsize=7)
dice_ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "curves.png", dpi=110)

bf16 = [r[1] for r in rows if r[0].startswith("bf16") and r[1] is not None]
fp32 = {r[0]: r[1] for r in rows if r[0].startswith("fp32")}
lines = [
    f"# fp32 vs bf16 training on the CPU, fold 0 of the paper recipe (commit {os.environ['COMMIT']})",
    "",
    f"CPU: {os.environ['CPU']}. Held-out Dice and IoU on the fold's test images (200 for Kvasir-SEG), threshold 0.5.",
    "",
    "| run | held-out Dice | held-out IoU | last train loss | wall s |",
    "|---|---:|---:|---:|---:|",
    *[f"| {n} | {d:.4f} | {i:.4f} | {l:.4f} | {w} |" for n, d, i, l, w in rows],
    "",
]
bf16_seed0 = next((r[1] for r in rows if r[0] == "bf16-seed0"), None)
if len(bf16) >= 2 and "fp32-seed0" in fp32 and bf16_seed0 is not None:
    spread = max(bf16) - min(bf16)
    gap = abs(fp32["fp32-seed0"] - bf16_seed0)
    lines += [
        f"Seed-to-seed spread of bf16 (max - min over {len(bf16)} seeds): {spread:.4f}; std {statistics.stdev(bf16):.4f}.",
        f"fp32 vs bf16, same seed and split: |{fp32['fp32-seed0']:.4f} - {bf16_seed0:.4f}| = {gap:.4f}: "
        + ("within the spread." if gap <= spread else "LARGER than the spread."),
    ]
(out / "parity.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
