"""Helpers shared by the CLI modules: console, one-line user errors and warnings, device choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from polypseg.errors import PolypsegError

# Markup is off by default: most lines print data (paths, file names, messages) in which brackets
# are text. Lines with a style pass markup=True and escape() their data.
console = Console(stderr=True, markup=False, highlight=False)


class UsageError(PolypsegError):
    """A bad command-line value; the message names the option."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on one line and exit with ``code``."""
    from rich.markup import escape

    # escaped: a file name such as "a[/b].jpg" is text, not rich markup
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """One ``warning:`` line; file names in it shown as text (:func:`polypseg.core.io_utils.display_name`)."""
    from rich.markup import escape

    from polypseg.core.io_utils import display_name

    console.print(f"[yellow]warning:[/] {escape(display_name(message))}", highlight=False, soft_wrap=True, markup=True)


def say(message: str) -> None:
    """One plain line (no markup), file names shown as text."""
    from polypseg.core.io_utils import display_name

    console.print(display_name(message), highlight=False, soft_wrap=True, markup=False)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; validates explicit choices (see :mod:`polypseg.core.devices`)."""
    from polypseg.core.devices import resolve_device as resolve

    return str(resolve(device, label="--device"))


def write_json(path: Path, data: Any, option: str) -> None:
    """Write ``data`` to the file ``option`` named; a failed write is one line naming the option
    (check the path first with :func:`polypseg.data.inputs.check_output_path`, before the work)."""
    from polypseg.core.io_utils import atomic_write_json

    try:
        atomic_write_json(path, data)
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot write it ({error.strerror or error})") from None


def keep_freed_memory_on_cpu(device: str) -> None:
    """On a CPU, let glibc keep freed memory for reuse for the rest of this command
    (:func:`polypseg.core.devices.keep_freed_cpu_memory`): training steps and Grad-CAM batches then
    reuse their large blocks instead of page-faulting them in every time. The training, Grad-CAM and
    their benchmark commands opt in; library calls never change the allocator themselves."""
    from polypseg.core.devices import DeviceError, keep_freed_cpu_memory
    from polypseg.core.devices import resolve_device as resolve

    try:
        on_cpu = resolve(device).type == "cpu"
    except DeviceError:
        return  # the command names the bad --device itself, in its own order of checks
    if on_cpu:
        keep_freed_cpu_memory()
