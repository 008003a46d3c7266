"""The CLI: --help is complete, user mistakes give one line and exit code 2, data check exit codes."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from polypseg.cli.main import app
from polypseg.data.sample_data import sample_dataset_path

from helpers import write_synthetic_dataset

runner = CliRunner()


def polypseg(*args: str) -> subprocess.CompletedProcess:
    """Run the real entry point (``main()``: the one-line error handling) in this process."""
    import contextlib
    import io

    from polypseg.cli import main as cli_main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        old_argv = sys.argv
        sys.argv = ["polypseg", *args]
        try:
            cli_main.main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.argv = old_argv
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


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
    arch = polypseg("cv", "--out", str(tmp_path / "r"), "--set", "model.arch=transunet")
    assert arch.returncode == 2 and "unknown architecture 'transunet'" in arch.stderr and "Traceback" not in arch.stderr
    encoder = polypseg("train", "--out", str(tmp_path / "t"), "--set", "model.encoder=resnet999")
    assert encoder.returncode == 2 and "resnet999" in encoder.stderr and "Traceback" not in encoder.stderr
    weights = polypseg("train", "--out", str(tmp_path / "t"), "--encoder-weights", str(tmp_path / "w.pth"))
    assert weights.returncode == 2 and "--encoder-weights" in weights.stderr
    init = polypseg("train", "--out", str(tmp_path / "t"), "--recipe", "demo", "--init", "kvasir-unet-r34")
    assert init.returncode == 2 and "Traceback" not in init.stderr  # the shipped model is a ResNet-34, demo is not
    assert "--init kvasir-unet-r34: its model differs from this run's in model.encoder" in init.stderr
    refine = polypseg("train", "--out", str(tmp_path / "t"), "--recipe", "cpu-refine")
    assert refine.returncode == 2 and "pass --init MODEL" in refine.stderr
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_resume_refuses_options_that_change_the_run(tmp_path):
    import json

    from polypseg.core.recipes import get_recipe

    run = tmp_path / "r"
    run.mkdir()
    saved = {"run": get_recipe("strong").to_dict(), "data": str(tmp_path / "data"), "folds": 5, "seed": 0}
    (run / "config.json").write_text(json.dumps(saved))
    result = polypseg("cv", "--out", str(run), "--resume", "--epochs", "3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.epochs: 200 -> 3" in result.stderr  # the base is the run's own recipe, not the default
    folds = polypseg("cv", "--out", str(run), "--resume", "--folds", "10")
    assert folds.returncode == 2 and "folds: 5 -> 10" in folds.stderr
    trained = tmp_path / "t"
    trained.mkdir()
    get_recipe("strong").save(trained / "config.json")
    recipe = polypseg("train", "--out", str(trained), "--resume", "--recipe", "paper")
    assert recipe.returncode == 2 and "train.recipe: 'strong' -> 'paper'" in recipe.stderr


def test_download_of_wrong_archive_is_refused_and_leaves_nothing(tmp_path):
    import zipfile

    archive = tmp_path / "kvasir.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Kvasir-SEG/images/only.jpg", b"not the real dataset")
        zf.writestr("Kvasir-SEG/masks/only.jpg", b"not the real dataset")
    result = polypseg("data", "download", "kvasir-seg", "--to", str(tmp_path / "data"), "--url", archive.as_uri())
    assert result.returncode == 2, result.stderr
    assert "missing file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "kvasir-seg").exists()


def test_console_script_entry_point_runs():
    import polypseg

    result = subprocess.run(
        [sys.executable, "-m", "polypseg.cli.main", "--version"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip() == f"polypseg {polypseg.__version__}"


def test_version_matches_the_installed_distribution():
    from importlib.metadata import version

    from polypseg._version import __version__

    assert __version__ == version("polypseg")


# Runs in a fresh interpreter: every --help (found by walking the command tree), --version and
# a bare `import polypseg`, then lists the heavy libraries that got imported. Not a timing test:
# what makes start-up slow (about 7 s) is importing torch and smp, so their absence is checked.
_HELP_WITHOUT_HEAVY_IMPORTS = r"""
import json, sys
import typer
from typer.testing import CliRunner
import polypseg
import polypseg.cli.main
from polypseg.cli.main import app

def paths(command, prefix=()):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from paths(sub, (*prefix, name))

runner = CliRunner()
invocations = [["--version"]] + [[*path, "--help"] for path in paths(typer.main.get_command(app))]
failed = [(args, r.output) for args in invocations for r in [runner.invoke(app, args)] if r.exit_code != 0]
heavy = ("torch", "torchvision", "segmentation_models_pytorch", "safetensors", "onnxruntime", "matplotlib", "fastapi", "scipy")
print(json.dumps({"invocations": invocations, "failed": failed, "imported": [m for m in heavy if m in sys.modules]}))
"""


def test_help_and_version_do_not_import_torch():
    import json

    result = subprocess.run(
        [sys.executable, "-c", _HELP_WITHOUT_HEAVY_IMPORTS], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == []
    assert ["cv", "--help"] in report["invocations"] and ["data", "check", "--help"] in report["invocations"]
    assert len(report["invocations"]) >= 20  # every command and subcommand
    assert report["imported"] == [], f"--help/--version imported {report['imported']}"


def test_public_api_loads_on_first_use():
    import polypseg
    from polypseg import create_model, get_recipe, load_checkpoint  # noqa: F401  (the README's import)

    assert create_model is polypseg.models.factory.create_model and get_recipe("demo").train.recipe == "demo"
    assert {"create_model", "load_checkpoint", "get_recipe", "__version__"} <= set(dir(polypseg))
    import pytest

    with pytest.raises(AttributeError, match="no_such_name"):
        polypseg.no_such_name  # noqa: B018


def _all_help_texts() -> dict[str, str]:
    import typer

    def paths(command, prefix=()):
        yield prefix
        for name, sub in getattr(command, "commands", {}).items():
            yield from paths(sub, (*prefix, name))

    wide = CliRunner()
    texts = {}
    for path in paths(typer.main.get_command(app)):
        result = wide.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        texts[" ".join(path) or "polypseg"] = result.output
    return texts


def test_help_shows_no_value_after_flags():
    """Flags (--help, --resume, --progress/--no-progress) take no value, so help must not print one."""
    import re

    texts = _all_help_texts()
    for command, text in texts.items():
        assert "<bool>" not in text and "BOOLEAN" not in text, command
        assert re.search(r"--help\s+Show this message", text), command  # nothing between flag and help
    cv = texts["cv"]
    for flag, help_start in (
        ("--resume", "Continue"),
        ("--no-progress", "Show progress"),
        ("--no-explain", "Measure"),
        ("--no-skip", "U-Net"),
    ):
        assert re.search(rf"{flag}\s+{help_start}", cv), flag
    # an option that takes a value keeps its type label (<int range> in typer 0.29, INTEGER RANGE before)
    assert re.search(r"--epochs\s+\S.*Override the recipe's epochs", cv) and not re.search(r"--epochs\s+Override", cv)


def _fake_summary(recipe: str) -> SimpleNamespace:
    """What ``cv`` prints from run_cv's CVSummary: the recipe, threshold and spread across folds."""
    spread = {"dice": [0.2951, 0.0952], "iou": [0.2, 0.07]}
    spreads = SimpleNamespace(at_0_5=spread, at_chosen=spread, at_crossfit=None)
    return SimpleNamespace(recipe=recipe, threshold=0.45, mean_std=spreads)


def test_demo_run_says_its_low_score_is_expected(tmp_path, monkeypatch):
    import polypseg.experiments.cv

    monkeypatch.setattr(
        polypseg.experiments.cv,
        "run_cv",
        lambda *args, **kwargs: _fake_summary(kwargs.get("config", args[2]).train.recipe),
    )
    demo = runner.invoke(app, ["cv", "--recipe", "demo", "--out", str(tmp_path / "demo"), "--device", "cpu"])
    assert demo.exit_code == 0, demo.output
    assert "Dice 0.2951 ± 0.0952" in demo.output
    assert "low score is expected" in " ".join(demo.output.split())
    paper = runner.invoke(app, ["cv", "--recipe", "paper", "--out", str(tmp_path / "paper"), "--device", "cpu"])
    assert paper.exit_code == 0, paper.output
    assert "Dice 0.2951" in paper.output and "expected" not in paper.output


def test_fold_progress_is_numbered_like_the_fold_folders(tmp_path, monkeypatch):
    """The progress bar of fold_1 says fold 1 (folders fold_0..fold_{k-1}), not fold 2/k."""
    import polypseg.experiments.cv

    class Stop(Exception):
        pass

    seen = []

    def fake_train_model(*args, description="", **kwargs):
        seen.append((args[3].name, description))
        raise Stop

    monkeypatch.setattr(polypseg.experiments.cv, "train_model", fake_train_model)
    data = write_synthetic_dataset(tmp_path / "data", n=6)
    result = runner.invoke(
        app,
        [
            "cv",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--folds",
            "3",
            "--only-fold",
            "1",
            "--recipe",
            "demo",
            "--image-size",
            "32",
            "--device",
            "cpu",
            "--no-progress",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert isinstance(result.exception, Stop), result.output
    assert seen == [("fold_1", "fold 1 (of 0-2)")]


def test_every_recipe_option_reaches_the_config_of_train_and_cv(tmp_path, monkeypatch):
    """The shortcut options and --set arrive in the config that cv and train hand to the library."""
    import polypseg.experiments.cv
    import polypseg.training.train_split

    class Stop(Exception):
        pass

    seen = {}

    def capture(name):
        def fake(*args, **kwargs):
            seen[name] = args[2]
            raise Stop

        return fake

    monkeypatch.setattr(polypseg.experiments.cv, "run_cv", capture("cv"))
    monkeypatch.setattr(polypseg.training.train_split, "train_single_split", capture("train"))
    options = ["--recipe", "demo", "--no-skip", "--epochs", "3", "--batch-size", "5", "--lr", "0.002"]
    options += ["--loss", "dice_bce", "--image-size", "64", "--seed", "7", "--precision", "fp32"]
    options += ["--encoder-weights", "none", "--set", "train.ema_decay=0.5", "--device", "cpu"]
    for command in ("cv", "train"):
        result = runner.invoke(app, [command, "--out", str(tmp_path / command), *options])
        assert isinstance(result.exception, Stop), result.output
        config = seen[command]
        assert config.train.recipe == "demo" and config.model.skip_connections is False
        assert (config.train.epochs, config.train.batch_size, config.train.lr) == (3, 5, 0.002)
        assert (config.train.loss, config.train.image_size, config.train.seed) == ("dice_bce", 64, 7)
        assert (config.train.precision, config.model.encoder_weights) == ("fp32", "none")
        assert config.train.ema_decay == 0.5


def test_ctrl_c_offers_resume_only_where_the_command_has_it(monkeypatch, capsys):
    """Through typer, which turns a KeyboardInterrupt inside a command into a silent exit 130."""
    import typer

    import polypseg.cli.main as cli_main

    interrupted = typer.Typer()

    @interrupted.command()
    def cv(out: str = typer.Option(...)) -> None:
        raise KeyboardInterrupt

    @interrupted.command()
    def predict(path: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "app", interrupted)
    for argv, hint in ((["polypseg", "cv", "--out", "r"], True), (["polypseg", "predict", "x.png"], False)):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            cli_main.main()
        assert exit_info.value.code == 130
        err = capsys.readouterr().err  # the CLI's messages go to stderr
        assert "finished work is kept" in err and ("--resume" in err) == hint


def test_ctrl_c_that_typer_turned_into_an_abort_is_an_interruption(monkeypatch, capsys):
    """typer < 0.15 raises Abort from the KeyboardInterrupt; a plain Abort (Ctrl-D at a prompt) stays one."""
    import typer

    import polypseg.cli.main as cli_main

    aborted = typer.Typer()

    @aborted.command()
    def cv(interrupt: bool = False) -> None:
        if interrupt:
            raise typer.Abort() from KeyboardInterrupt()
        raise typer.Abort()

    @aborted.command()
    def other() -> None:
        pass

    monkeypatch.setattr(cli_main, "app", aborted)
    for args, code, said in ((["--interrupt"], 130, "interrupted; finished work is kept"), ([], 1, "aborted")):
        monkeypatch.setattr(sys, "argv", ["polypseg", "cv", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli_main.main()
        assert exit_info.value.code == code
        assert capsys.readouterr().err.startswith(said)


def test_output_names_differ_ignoring_case():
    """IMG_1.png and img_1.jpg would overwrite each other's mask on macOS and Windows."""
    from polypseg.data.inputs import unique_names

    assert unique_names(["IMG_1", "img_1", "Img_1", "other"]) == ["IMG_1", "img_1-2", "Img_1-3", "other"]


def test_data_cache_checks_out_before_building_and_writes_it_whole(tmp_path):
    def cache_to(out):
        args = ["data", "cache", str(sample_dataset_path()), "--size", "32", "--cache-dir", str(tmp_path / "c")]
        return runner.invoke(app, [*args, "--out", str(out)])

    bad = cache_to(tmp_path / "x.txt")
    assert bad.exit_code == 2 and not (tmp_path / "c").exists()  # refused before minutes of caching
    good = cache_to(tmp_path / "s.npz")
    assert good.exit_code == 0, good.output
    assert (tmp_path / "s.npz").is_file() and not list(tmp_path.glob(".s.npz.*"))


def test_usage_errors_are_one_line_naming_the_option_and_the_help():
    for args, start, help_hint in (
        (("predict", "--bogus"), "error: No such option: --bogus", "'polypseg predict --help'"),
        (("nosuch",), "error: No such command 'nosuch'.", "'polypseg --help'"),
        (("cv", "--folds", "x"), "error: Invalid value for '--folds'", "'polypseg cv --help'"),
    ):
        result = polypseg(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start) and help_hint in lines[0], result.stderr
        assert "╭" not in result.stderr and "Traceback" not in result.stderr
    bare = polypseg()  # no command: the help, as before
    assert bare.returncode == 2 and "Usage" in bare.stdout + bare.stderr and "error" not in bare.stderr
    version = polypseg("--version")
    assert version.returncode == 0 and version.stdout.startswith("polypseg ")


def test_a_commands_own_exit_code_is_kept(monkeypatch):
    import typer

    import polypseg.cli.main as cli_main

    app_with_codes = typer.Typer()

    @app_with_codes.command()
    def fails() -> None:
        raise typer.Exit(3)

    @app_with_codes.command()
    def works() -> None:
        print("done")

    monkeypatch.setattr(cli_main, "app", app_with_codes)
    assert polypseg("fails").returncode == 3
    ran = polypseg("works")
    assert (ran.returncode, ran.stdout) == (0, "done\n")


def test_python_dash_m_polypseg_is_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "polypseg", "--bogus"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2 and result.stderr.startswith("error: No such option: --bogus"), result.stderr
