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
