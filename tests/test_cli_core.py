"""The CLI: --help is complete, user mistakes give one line and exit code 2, data check exit codes."""

import subprocess
import sys

from typer.testing import CliRunner

from polypseg.cli.main import app
from polypseg.sample_data import sample_dataset_path

from helpers import write_synthetic_dataset

runner = CliRunner()


def polypseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polypseg.cli.main", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("cv", "train", "data"):
        assert command in result.output


def test_data_check_ok_and_errors(tmp_path):
    ok = runner.invoke(app, ["data", "check", str(sample_dataset_path())])
    assert ok.exit_code == 0, ok.output
    root = write_synthetic_dataset(tmp_path / "d", n=3)
    (root / "images" / "case01.jpg").write_bytes(b"junk")
    bad = runner.invoke(app, ["data", "check", str(root)])
    assert bad.exit_code == 1
    assert "case01.jpg" in bad.output


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = polypseg("cv", "--out", str(tmp_path / "r"), "--set", "train.nonsense=1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "nonsense" in result.stderr
    missing = polypseg("data", "check", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
    weights = polypseg("train", "--out", str(tmp_path / "t"), "--encoder-weights", str(tmp_path / "w.pth"))
    assert weights.returncode == 2 and "--encoder-weights" in weights.stderr


def test_resume_refuses_new_recipe_options(tmp_path):
    result = polypseg("cv", "--out", str(tmp_path / "r"), "--resume", "--epochs", "3")
    assert result.returncode == 2 and "--resume" in result.stderr
