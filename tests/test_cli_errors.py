"""User errors print one line whatever characters the named file has (rich markup is escaped)."""

from __future__ import annotations

import shutil

from polypseg.data.sample_data import sample_dataset_path
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


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_help_texts_are_shown_literally():
    """Help is plain text: "pip install 'polypseg[openvino]'" must print as written (rich markup once
    swallowed the brackets), so no help text carries a markup escape either."""
    import typer
    from typer.testing import CliRunner

    from polypseg.cli.main import app

    def texts(command, name: str):
        yield name, command.help or ""
        for param in command.params:
            yield f"{name} {param.name}", getattr(param, "help", None) or ""
        for sub_name, sub in getattr(command, "commands", {}).items():  # a group's commands
            yield from texts(sub, f"{name} {sub_name}")

    checked = 0
    for where, text in texts(typer.main.get_command(app), "polypseg"):
        assert "\\[" not in text, where
        checked += 1
    assert checked > 100
    for command in ("bench", "predict"):
        shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"}).output
        assert "pip install 'polypseg[openvino]'" in " ".join(shown.split()), command


def test_output_paths_are_checked_before_the_work(tmp_path):
    """A --json/--out that cannot be written was a traceback after the work (minutes of benchmarking lost)."""
    folder = tmp_path / "results.json"
    folder.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [
        (["bench", "--model", "random", "--json", str(folder)], "--json", "is a folder"),
        (["bench-explain", "--model", "random", "--json", str(folder)], "--json", "is a folder"),
        (["bench-train", "--recipe", "demo", "--json", str(blocker / "x.json")], "--json", "is a file, not a folder"),
        (["export", "--model", "kvasir-unet-r34", "--out", str(blocker / "m.onnx")], "--out", "is a file"),
        (["export", "--model", "kvasir-unet-r34", "--out", str(tmp_path / "m.onnx"), "--json", str(folder)], "--json", "is a folder"),
        (["train", "--recipe", "demo", "--out", str(blocker)], "--out", "is an existing file"),
        (["cv", "--recipe", "demo", "--out", str(blocker / "run")], "--out", "is a file, not a folder"),
        (["data", "cache", str(sample_dataset_path()), "--out", str(tmp_path / "d.npz"), "--cache-dir", str(blocker)], "--cache-dir", "not a folder"),
    ]  # fmt: skip
    for args, option, cause in cases:
        result = polypseg(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        (error,) = _error_lines(result)
        assert option in error and cause in error, (args, error)
    assert not (tmp_path / "m.onnx").exists() and blocker.read_text() == "x"


def test_bad_numbers_name_their_option(tmp_path):
    """--image-size 0 was a torch traceback; --repeats 0 said 'batch_size and repeats must be >= 1';
    --opset 3 printed onnx's traceback and quietly wrote opset 18; --calibration-count 0 a traceback."""
    onnx_out = str(tmp_path / "m.onnx")
    cases = [
        (["bench", "--model", "random", "--image-size", "0"], "--image-size 0"),
        (["bench", "--model", "random", "--repeats", "0"], "--repeats 0"),
        (["bench", "--model", "random", "--warmup", "-1"], "--warmup -1"),
        (["export", "--model", "kvasir-unet-r34", "--out", onnx_out, "--opset", "3"], "--opset 3"),
        (["export", "--model", "kvasir-unet-r34", "--out", onnx_out, "--opset", "999"], "--opset 999"),
        (["export", "--model", "kvasir-unet-r34", "--out", onnx_out, "--int8", "--calibration-count", "0"], "--calibration-count 0"),
        (["cv", "--recipe", "demo", "--out", str(tmp_path / "cv"), "--seed", "-1"], "--seed"),
        (["train", "--recipe", "demo", "--out", str(tmp_path / "one"), "--seed", "-1"], "--seed"),
    ]  # fmt: skip
    for args, named in cases:
        result = polypseg(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        (error,) = _error_lines(result)
        assert named in error, (args, error)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "cv").exists()


def test_missing_test_list_is_one_line_before_training(tmp_path):
    for target, cause in ((tmp_path / "nowhere.txt", "not found"), (tmp_path, "is a folder")):
        result = polypseg("train", "--recipe", "demo", "--out", str(tmp_path / "run"), "--test-list", str(target))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (error,) = _error_lines(result)
        assert f"--test-list {target}: {cause}" in error
    assert not (tmp_path / "run").exists()


def test_a_failed_write_on_a_named_file_is_one_line(monkeypatch):
    """Any command: an OSError about a file (here an output path that is a folder, as `compare --out DIR`
    gave) is one line naming the target, not the temporary file; other OSErrors keep their traceback."""
    import errno
    import os

    import pytest
    import typer

    from polypseg.cli import main as cli_main

    odd = os.fsdecode(b"/tmp/out\xff.md")
    tiny = typer.Typer()

    @tiny.command()
    def write(kind: str) -> None:
        if kind == "rename":
            raise IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp/.out.md.pid1.x.tmp", None, odd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli_main, "app", tiny)
    result = polypseg("rename")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _error_lines(result) == ["error: /tmp/out\\xff.md: a folder stands where a file is needed"]
    with pytest.raises(OSError, match="Input/output"):
        polypseg("other")


def test_a_split_or_model_that_cannot_train_is_one_line(tmp_path):
    """A --test-list of every stem was numpy's 'non-zero output size' (demo) or 'the training set is
    empty' (adapt); --set model.in_channels=1 a conv2d error after caching; model.classes=2 an assert."""
    from helpers import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n=3)
    every = tmp_path / "all.txt"
    every.write_text("case00\ncase01\ncase02\n")
    base = ["train", "--data", str(data), "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    cases = [
        (["--recipe", "demo", "--test-list", str(every)], "no pair is left to train on (3 in --test-list"),
        (["--recipe", "adapt", "--test-list", str(every)], "no pair is left to train on (3 in --test-list"),
        (["--recipe", "demo", "--set", "model.in_channels=1"], "model.in_channels 1: must be 3"),
        (["--recipe", "demo", "--set", "model.classes=2"], "model.classes 2: must be 1"),
    ]
    for args, named in cases:
        result = polypseg(*base, *args, "--out", str(tmp_path / "run"))
        assert result.returncode != 0 and "Traceback" not in result.stderr, (args, result.stderr)
        (error,) = _error_lines(result)
        assert named in error, (args, error)
        assert not (tmp_path / "run" / "config.json").exists()
