"""The GPU measurement scripts, smoke-run on the CPU with tiny data so they work when a GPU is lent.

No timing is checked here (timings are measured, never asserted); what is checked is that every
step runs, resumes, skips what is done and packs its small result files for the device to bring back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
TINY_SETS = " ".join(
    [
        "--set train.image_size=64",
        "--set train.epochs=1",
        f"--set model.encoder={TINY_MODEL['encoder']}",
        "--set model.decoder_channels=[16,16,16,16,16]",
        "--set train.batch_size=4",
        "--set train.compile=false",
    ]
)

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")


def _polypseg(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-m", "polypseg.cli.main", *args], check=True, env=env, capture_output=True)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """64 px caches of the bundled sample (training) and a synthetic set (external), as carried to a GPU."""
    from polypseg.sample_data import sample_dataset_path

    from helpers import write_synthetic_dataset

    root = tmp_path_factory.mktemp("bench_data")
    kvasir, cvc = root / "kvasir-64.npz", root / "cvc-64.npz"
    _polypseg("data", "cache", str(sample_dataset_path()), "--size", "64", "--out", str(kvasir))
    _polypseg("data", "cache", str(write_synthetic_dataset(root / "cvc", n=6)), "--size", "64", "--out", str(cvc))
    return {"KVASIR": kvasir, "CVC": cvc}


def _session(tmp_path: Path, caches: dict[str, Path], **env: str) -> str:
    environment = {
        **os.environ,
        "DEVICE": "cpu",
        "SMOKE": "1",
        "FOLDS": "2",
        "RUNS": str(tmp_path / "runs"),
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "POLYPSEG_CACHE": str(tmp_path / "cache"),
        "SETS": TINY_SETS,
        "COMMIT": "test",
        **{k: str(v) for k, v in caches.items()},
        **env,
    }
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_session.sh")], env=environment, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_gpu_session_runs_every_step_resumes_and_packs_results(tmp_path: Path, caches: dict[str, Path]) -> None:
    log = _session(tmp_path, caches, LEVERS="no-ema")
    for step in ("train-speed", "paper", "explain-speed", "speed-b1", "int8-check", "skip-ablation", "speed-b256", "lever-no-ema"):
        assert f"== {step}: done in" in log, step
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as archive:
        names = {Path(name).as_posix().removeprefix("./") for name in archive.getnames()}
        paper_config = json.load(archive.extractfile("./paper-5fold/config.json"))
        ablation_config = json.load(archive.extractfile("./skip-ablation/with-skips/config.json"))
        levers = archive.extractfile("./strong-levers/levers.md").read().decode()
    for expected in (
        "paper-5fold/summary.json", "paper-5fold/summary.md", "paper-5fold/splits.json", "paper-5fold/ENVIRONMENT.txt",
        "paper-5fold/fold_1/history.json", "bench/explain_speed.txt", "bench/bench_gpu_b1.json", "bench/bench_gpu_b2.json",
        "bench/int8_dice.json", "bench/train_speed.md", "bench/train_speed_strong-b64.json",
        "skip-ablation/skip_ablation.md", "skip-ablation/no-skips/summary.json",
        "external-cvc62/with-skips/external_cvc.md", "external-cvc62/no-skips/external_cvc.json",
        "strong-levers/no-ema/summary.json",
    ):
        assert expected in names, expected
    assert not any(name.endswith((".safetensors", ".npz")) for name in names)  # never weights or predictions
    # the paper run is the ablation's with-skips arm, reused rather than trained twice
    assert paper_config == ablation_config
    assert "| no-ema |" in levers

    # a second call skips what is done; the final strong run is only run when asked for
    again = _session(tmp_path, caches, STEPS="paper levers strong-5fold", LEVERS="no-ema")
    assert "== paper: done in an earlier call" in again and "== lever-no-ema: done in an earlier call" in again
    assert "== strong-5fold: done in" in again
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as archive:
        names = {Path(name).as_posix().removeprefix("./") for name in archive.getnames()}
    assert {"strong-5fold/summary.json", "strong-5fold/external_cvc.md", "paper-5fold/summary.json"} <= names


def test_gpu_session_refuses_an_unknown_step(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_session.sh")],
        env={**os.environ, "STEPS": "nonsense", "RUNS": str(tmp_path / "runs"), "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "unknown step 'nonsense'" in result.stdout + result.stderr
