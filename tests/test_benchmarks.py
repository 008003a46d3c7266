"""The GPU measurement scripts, smoke-run on the CPU with tiny data, so they work on their first GPU run.

No timing is checked here (timings are measured, never asserted), and nothing depends on the
machine's speed: the smoke run has no time budget (``BUDGET_S=inf``), so every step runs however
loaded the machine is, and the budget rule is tested on the script's simulated clock (``PLAN=1``).
What is checked is that every step runs, resumes, skips what is done and packs its small result
files into one archive.

The scripts start two dozen Python processes; most tests give them a warm interpreter
(``tests/warm_python.py``: one server imports torch once, each process is a fork of it), so they
spend their time on the scripts' work rather than on imports. The train_long_gpu.sh test runs its
script on the real interpreter, so a script that only works in a warm one would still fail there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import TINY_MODEL
from warm_python import warm_python

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

pytestmark = [
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar"),
    pytest.mark.slow,  # the benchmark scripts, run end to end: the smoke run of gpu_session.sh alone takes minutes
]


def _polypseg(python: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([str(python), "-m", "polypseg.cli.main", *args], check=True, env=env, capture_output=True)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """64 px caches of the bundled sample (training) and a synthetic set (external), as carried to a GPU.

    Made by ``polypseg data cache --out`` in this process: the scripts under test only read the files.
    """
    from typer.testing import CliRunner

    from polypseg.cli.main import app
    from polypseg.data.sample_data import sample_dataset_path

    from helpers import write_synthetic_dataset

    root = tmp_path_factory.mktemp("bench_data")
    kvasir, cvc = root / "kvasir-64.npz", root / "cvc-64.npz"
    for data, out in ((sample_dataset_path(), kvasir), (write_synthetic_dataset(root / "cvc", n=6), cvc)):
        args = ["data", "cache", str(data), "--size", "64", "--out", str(out), "--cache-dir", str(root / "cache")]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    return {"KVASIR": kvasir, "CVC": cvc}


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The scripts' ``PYTHON``: a warm interpreter that each script call gives its own ``PYTHONPATH``.

    Linux only (it forks a process that has loaded torch); elsewhere the real interpreter."""
    if sys.platform != "linux":
        yield Path(sys.executable)
        return
    # The server starts without PYTHONPATH, so its sys.path is a plain interpreter's (site-packages and
    # .pth entries, an editable install included); each call adds its own PYTHONPATH, as common.sh sets it.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    with warm_python(tmp_path_factory.mktemp("warm"), env=env) as executable:
        yield executable


def test_the_warm_interpreter_runs_commands_as_python_does(python: Path, tmp_path: Path) -> None:
    """Arguments, working directory, environment, streams and exit status reach the script and come back."""

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "WARM_CHECK": "yes"}
        return subprocess.run([str(python), *args], input=stdin, capture_output=True, text=True, cwd=tmp_path, env=env)

    shown = run("-c", "import os, sys; print(sys.argv, os.getcwd(), os.environ['WARM_CHECK'])", "a b", "c")
    assert shown.returncode == 0 and shown.stdout == f"['-c', 'a b', 'c'] {os.path.realpath(tmp_path)} yes\n"
    piped = run("-", "x", stdin="import sys; print(sys.argv, sys.stdin.read() == ''); sys.exit(3)")
    assert piped.returncode == 3 and piped.stdout == "['-', 'x'] True\n"
    failed = run("-c", "import sys; print('out'); print('err', file=sys.stderr); raise ValueError('boom')")
    assert failed.returncode == 1 and failed.stdout == "out\n" and "err\n" in failed.stderr
    assert "ValueError: boom" in failed.stderr
    (tmp_path / "script.py").write_text("import sys\nsys.exit(sys.argv[1])\n")
    message = run("script.py", "no such file")
    assert message.returncode == 1 and message.stderr == "no such file\n"
    module = run("-m", "polypseg.cli.main", "--version")
    assert module.returncode == 0 and module.stdout.startswith("polypseg ")
    assert run("-m", "polypseg.cli.main", "no-such-command").returncode == 2


def _session(tmp_path: Path, caches: dict[str, Path], python: Path, **env: str) -> str:
    environment = {
        **os.environ,
        "DEVICE": "cpu",
        "SMOKE": "1",
        "FOLDS": "2",
        "RUNS": str(tmp_path / "runs"),
        "OUT": str(tmp_path / "out"),
        "PYTHON": str(python),
        "POLYPSEG_CACHE": str(tmp_path / "cache"),
        "SETS": TINY_SETS,
        "COMMIT": "test",
        "BUDGET_S": "inf",  # every step runs, whatever this machine's speed or load
        **{k: str(v) for k, v in caches.items()},
        **env,
    }
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_session.sh")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=3600,
    )  # the timeout only stops a hung script; a loaded 2-core machine takes a few minutes
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def test_gpu_session_runs_every_step_resumes_and_packs_results(
    tmp_path: Path, caches: dict[str, Path], python: Path
) -> None:
    log = _session(tmp_path, caches, python, LEVERS="no-ema")
    for step in (
        "train-speed",
        "paper",
        "explain-speed",
        "speed-b1",
        "int8-check",
        "skip-ablation",
        "speed-b256",
        "lever-no-ema",
    ):
        assert f"== {step}: done in" in log, step
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as archive:
        names = {Path(name).as_posix().removeprefix("./") for name in archive.getnames()}
        paper_config = json.load(archive.extractfile("./paper-5fold/config.json"))
        ablation_config = json.load(archive.extractfile("./skip-ablation/with-skips/config.json"))
        levers = archive.extractfile("./strong-levers/levers.md").read().decode()
    for expected in (
        "paper-5fold/summary.json",
        "paper-5fold/summary.md",
        "paper-5fold/splits.json",
        "paper-5fold/ENVIRONMENT.txt",
        "paper-5fold/fold_1/history.json",
        "bench/explain_speed.txt",
        "bench/bench_gpu_b1.json",
        "bench/bench_gpu_b2.json",
        "bench/int8_dice.json",
        "bench/train_speed.md",
        "bench/train_speed_strong-b64.json",
        "skip-ablation/skip_ablation.md",
        "skip-ablation/no-skips/summary.json",
        "external-cvc62/with-skips/external_cvc.md",
        "external-cvc62/no-skips/external_cvc.json",
        "strong-levers/no-ema/summary.json",
    ):
        assert expected in names, expected
    assert not any(name.endswith((".safetensors", ".npz")) for name in names)  # never weights or predictions
    # the paper run is the ablation's with-skips arm, reused rather than trained twice
    assert paper_config == ablation_config
    assert "| no-ema |" in levers

    # a second call skips what is done; the final strong run is only run when asked for
    again = _session(tmp_path, caches, python, STEPS="paper levers strong-5fold", LEVERS="no-ema")
    assert "== paper: done in an earlier call" in again and "== lever-no-ema: done in an earlier call" in again
    assert "== strong-5fold: done in" in again
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as archive:
        names = {Path(name).as_posix().removeprefix("./") for name in archive.getnames()}
    assert {"strong-5fold/summary.json", "strong-5fold/external_cvc.md", "paper-5fold/summary.json"} <= names


def _plan(tmp_path: Path, **env: str) -> list[str]:
    """The session's ``PLAN=1`` output: what a call would run, on a simulated clock (nothing runs)."""
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_session.sh")],
        env={
            **os.environ,
            "PLAN": "1",
            "RUNS": str(tmp_path / "runs"),
            "OUT": str(tmp_path / "out"),
            "COMMIT": "test",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith("== ")]


def _decisions(lines: list[str]) -> dict[str, str]:
    return {line.split(":")[0].removeprefix("== "): line.split(": ")[1].split(" (")[0] for line in lines}


def test_gpu_session_budget_leaves_what_does_not_fit_for_the_next_call(tmp_path: Path) -> None:
    """The budget rule on the simulated clock: each step takes its estimate, so no machine speed enters."""
    steps = "train-speed paper explain-speed speed-b1 int8-check"
    # estimates 150, 240, 60, 180, 120 s: 150 + 240 + 60 = 450 s fit in 500 s; speed-b1 and int8-check do not
    decisions = _decisions(_plan(tmp_path, STEPS=steps, BUDGET_S="500"))
    assert decisions == {
        "train-speed": "would start",
        "paper": "would start",
        "explain-speed": "would start",
        "speed-b1": "left for the next call",
        "int8-check": "left for the next call",
    }
    # the first step of a call always starts, even one longer than the whole budget
    assert _decisions(_plan(tmp_path, STEPS="speed-b256 speed-b1", BUDGET_S="100")) == {
        "speed-b256": "would start",
        "speed-b1": "left for the next call",
    }
    # BUDGET_S=inf (the CPU smoke test) leaves nothing for later
    assert set(_decisions(_plan(tmp_path, STEPS=steps, BUDGET_S="inf")).values()) == {"would start"}
    # steps done in an earlier call are skipped and take no time
    (tmp_path / "runs" / ".session").mkdir(parents=True)
    (tmp_path / "runs" / ".session" / "paper.done").write_text("1.0\n")
    decisions = _decisions(_plan(tmp_path, STEPS=steps, BUDGET_S="500"))
    assert decisions["paper"] == "done in an earlier call" and decisions["speed-b1"] == "would start"
    assert decisions["int8-check"] == "left for the next call"  # 150 + 60 + 180 = 390 s; + 120 > 500
    assert not (tmp_path / "out").exists()  # a plan writes nothing


def test_gpu_session_refuses_a_bad_budget(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_session.sh")],
        env={**os.environ, "BUDGET_S": "soon", "RUNS": str(tmp_path / "runs"), "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "BUDGET_S=soon" in result.stderr


def test_gpu_session_refuses_an_unknown_step(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_session.sh")],
        env={**os.environ, "STEPS": "nonsense", "RUNS": str(tmp_path / "runs"), "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "unknown step 'nonsense'" in result.stdout + result.stderr


def test_backend_dice_scores_every_cpu_engine_against_fp32(tmp_path: Path, python: Path) -> None:
    """benchmarks/backend_dice.sh on a tiny trained run: export, int8 validation, one Dice per engine."""
    from helpers import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n=10)
    test_list = tmp_path / "test.txt"
    test_list.write_text("case00\ncase01\ncase02\n")
    run = tmp_path / "run"
    _polypseg(
        python, "train", "--data", str(data), "--test-list", str(test_list), "--out", str(run), "--recipe", "demo",
        "--epochs", "1", "--image-size", "64", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
        *TINY_SETS.split(),
    )  # fmt: skip
    environment = {
        **os.environ,
        "RUN": str(run),
        "MODEL": str(run / "best"),
        "DATA": str(data),
        "RESULTS": str(tmp_path / "results"),
        "PYTHON": str(python),
        "COMMIT": "test",
    }
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "backend_dice.sh")], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scores = json.loads((tmp_path / "results" / "backend_dice_best.json").read_text())
    assert scores["onnxruntime-fp32"]["change_vs_fp32"] == 0.0
    assert {"onnxruntime-int8", "torch-bf16"} <= set(scores)
    assert all(0.0 <= s["dice"] <= 1.0 for s in scores.values())
    assert "Dice on 3 images" in (tmp_path / "results" / "export_int8_best.log").read_text()
    assert "cpu flags:" in (tmp_path / "results" / "backend_dice_best.env.txt").read_text()


def test_train_long_gpu_trains_one_model_with_the_cross_centre_augmentations(tmp_path: Path) -> None:
    """benchmarks/train_long_gpu.sh on tiny data and a tiny model: it trains, holds out the test list,
    records the augmentations it was asked for and copies the run's small files, never weights."""
    from helpers import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n=10)
    test_list = tmp_path / "test.txt"
    test_list.write_text("case00\ncase01\n")
    environment = {
        **os.environ,
        "KVASIR": str(data),
        "TEST_LIST": str(test_list),
        "EPOCHS": "1",
        "DEVICE": "cpu",
        "RUNS": str(tmp_path / "runs"),
        "RESULTS": str(tmp_path / "results"),
        "POLYPSEG_CACHE": str(tmp_path / "cache"),
        "SETS": TINY_SETS,
        "PYTHON": sys.executable,
        "COMMIT": "test",
    }
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "train_long_gpu.sh")], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = tmp_path / "results" / "long-robust"
    config = json.loads((record / "config.json").read_text())
    assert config["train"]["augment"]["zoom_out_p"] == 0.25 and config["train"]["augment"]["noise_std"] == 0.04
    assert config["train"]["epochs"] == 1 and config["model"]["encoder"] == TINY_MODEL["encoder"]
    split = json.loads((record / "split.json").read_text())
    assert sorted(split["test"]) == ["case00", "case01"] and not {"case00", "case01"} & set(split["train"])
    assert not list(record.rglob("*.safetensors"))
    assert "wall time of the train command" in (record / "ENVIRONMENT.txt").read_text()


def test_weights_aside_moves_the_shipped_weights_out_and_back_checked(tmp_path: Path) -> None:
    """In a throwaway repository: out, status, back (SHA-256 against HEAD), and a changed file refused."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "weights_aside.sh", repo / "benchmarks")
    weights = repo / "src" / "polypseg" / "models" / "weights" / "kvasir-unet-r34.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"w" * 2_000_000)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    aside = tmp_path / "aside"

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(repo / "benchmarks" / "weights_aside.sh"), *args],
            env={**os.environ, "WEIGHTS_ASIDE": str(aside)},
            capture_output=True,
            text=True,
        )

    assert "would send 1 MiB of the 64 MiB limit" in call("status").stdout
    assert call("out").returncode == 0 and not weights.exists() and (aside / weights.name).is_file()
    assert "would send 0 MiB" in call("status").stdout
    assert "not here" in call("out").stderr
    assert call("back").returncode == 0 and weights.read_bytes() == b"w" * 2_000_000
    assert "nothing aside" in call("back").stderr

    call("out")
    (aside / weights.name).write_bytes(b"changed")
    refused = call("back")
    assert refused.returncode == 1 and "differs from HEAD" in refused.stderr
    assert call("bogus").returncode == 2
