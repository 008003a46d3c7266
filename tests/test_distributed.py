"""Multi-process training through torchrun: 2 CPU processes with the gloo backend."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polypseg.models.checkpoint import load_checkpoint

from helpers import QUICK_ENCODER, write_synthetic_dataset

pytestmark = pytest.mark.slow  # two torchrun processes: about a minute on 2 cores


def test_torchrun_two_processes_gloo(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", n=10)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "polypseg.cli.main",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--recipe",
        "demo",
        "--epochs",
        "2",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--set",
        f"model.encoder={QUICK_ENCODER}",
        "--set",
        "model.decoder_channels=[16,16,16,16,16]",
        "--set",
        "train.val_fraction=0.2",
        "--device",
        "cpu",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all("val_dice" in h for h in history)  # validated on rank 0
    checkpoint = load_checkpoint(out / "best")
    assert checkpoint.config.model.encoder == QUICK_ENCODER
    assert not any(k.startswith("module.") for k in checkpoint.model.state_dict())
