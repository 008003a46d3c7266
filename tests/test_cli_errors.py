"""User errors print one line whatever characters the named file has (rich markup is escaped)."""

from __future__ import annotations

import shutil

from polypseg.sample_data import sample_dataset_path
from test_cli_core import polypseg


def test_an_error_naming_a_bracketed_file_is_printed_verbatim(tmp_path):
    weird = tmp_path / "scan[bold][red]x.safetensors"
    weird.write_bytes(b"not a checkpoint")
    image = next((sample_dataset_path() / "images").glob("*.jpg"))
    shutil.copy(image, tmp_path / image.name)
    result = polypseg("predict", str(tmp_path / image.name), "--model", str(weird), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "MarkupError" not in result.stderr
    assert "scan[bold][red]x" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_ordinary_output_prints_bracketed_names_verbatim(tmp_path):
    """Not only errors: every line that prints a path shows its brackets as text (markup is opt-in)."""
    folder = tmp_path / "site[bold]A"
    shutil.copytree(sample_dataset_path(), folder)
    result = polypseg("data", "check", str(folder))
    assert result.returncode == 0, result.stderr
    assert "site[bold]A: 40 pairs" in result.stderr
    run = tmp_path / "run[red]1"
    trained = polypseg("train", "--recipe", "demo", "--epochs", "1", "--out", str(run), "--no-progress")
    assert trained.returncode == 0, trained.stderr
    assert f"checkpoint: {run / 'best.safetensors'}" in trained.stderr.replace("\n", "")
