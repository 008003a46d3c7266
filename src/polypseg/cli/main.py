"""Entry point: ``polypseg <command> --help`` documents every command.

Start-up stays light: this module and the command modules import torch, smp and the other heavy
libraries inside the command functions only, so ``--help`` and ``--version`` answer at once
(tests/test_cli_core.py checks that they leave torch unimported).
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import typer

from polypseg._version import __version__
from polypseg.cli.common import console
from polypseg.errors import PolypsegError

app = typer.Typer(
    name="polypseg",
    help="Explainable polyp segmentation: train, cross-validate, explain, predict, export, report, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help layout: flags print no value after them, help text is taken literally (no
    # markup to escape), and it reads the same in a terminal, a pipe and a log. Sub-apps set it too.
    rich_markup_mode=None,
)

# Each module defines ``register(app)``; a module whose optional dependencies are missing
# only loses its own commands.
COMMAND_MODULES = (
    "polypseg.cli.data_cmd",
    "polypseg.cli.train_cmd",
    "polypseg.cli.explain_cmd",
    "polypseg.cli.predict_cmd",
    "polypseg.cli.report_cmd",
    "polypseg.cli.serve_cmd",
    "polypseg.cli.models_cmd",
)


def _version(value: bool) -> None:
    if value:
        print(f"polypseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Explainable polyp segmentation in colonoscopy images (PolypSeg-GradCAM and beyond)."""


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as _error:
        if _error.name and _error.name.startswith("polypseg.cli."):
            continue  # command module not present in this build
        raise
    _module.register(app)


# The base of the usage errors typer raises. typer >= 0.26 carries its own click and does not raise
# click's classes (click is still installed, by uvicorn); 0.26 and 0.27 export no public base.
try:  # typer >= 0.28
    from typer import TyperException as _ClickError
except ImportError:
    try:  # typer 0.26, 0.27
        from typer._click.exceptions import ClickException as _ClickError  # type: ignore[no-redef]
    except ImportError:  # typer < 0.26 runs on click itself
        from click import ClickException as _ClickError  # type: ignore[no-redef,assignment]


def main() -> None:
    """Run the CLI; user errors, and failed operations on a named file, become one line on stderr and exit code 2."""
    try:
        # Not standalone: usage errors come here, to be said in one line like ours, instead of typer's
        # boxed panel under the usage text.
        code = app(standalone_mode=False, prog_name="polypseg")
    except _ClickError as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # a group called without a command: its help
            error.show()
            sys.exit(error.exit_code)
        from rich.markup import escape

        ctx = getattr(error, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if error.exit_code == 2 and ctx is not None else ""
        console.print(
            f"[bold red]error:[/] {escape(error.format_message() + hint)}", highlight=False, soft_wrap=True, markup=True
        )
        sys.exit(error.exit_code)
    except typer.Abort as error:  # Ctrl-D at a prompt
        if isinstance(error.__cause__, KeyboardInterrupt):  # typer < 0.15 turns Ctrl-C into an Abort
            _say_interrupted()
            sys.exit(130)
        console.print("aborted", highlight=False)
        sys.exit(1)
    except PolypsegError as error:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(2)
    except OSError as error:
        if error.filename is None and error.filename2 is None:
            raise  # not about a file: a bug, keep the traceback
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(_file_error(error))}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(2)
    except KeyboardInterrupt:  # before typer runs a command (typer turns one inside into exit 130)
        _say_interrupted()
        sys.exit(130)
    except SystemExit as exit_:
        if exit_.code == 130:
            _say_interrupted()
        raise
    # A command's typer.Exit(code), --help and --version end here with their exit code; typer turns
    # Ctrl-C inside a command into 130 without a word.
    if code == 130:
        _say_interrupted()
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)


# What a failed file operation means for the user, where strerror alone is cryptic ("File exists").
_FILE_ERRORS = {
    errno.EEXIST: "a file stands where a folder is needed",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EISDIR: "a folder stands where a file is needed",
}


def _file_error(error: OSError) -> str:
    """One line for an ``OSError`` on a file the user named (an output path that is a folder, a full
    disk, ...): the path (a rename's target, not its temporary file) and what went wrong."""
    from polypseg.core.io_utils import display_name

    path = error.filename2 if error.filename2 is not None else error.filename
    cause = _FILE_ERRORS.get(error.errno or 0, error.strerror or type(error).__name__)
    if error.errno == errno.EEXIST and os.path.isdir(path):
        cause = error.strerror or cause  # a folder already there: not a file in the way
    return f"{display_name(path if isinstance(path, str | bytes) else str(path))}: {cause}"


def _say_interrupted() -> None:
    resumable = {"train", "cv", "study"}  # the commands with --resume
    hint = " (rerun with --resume to continue)" if resumable & set(sys.argv[1:2]) else ""
    console.print(f"interrupted; finished work is kept{hint}")


if __name__ == "__main__":
    main()
