"""A Python interpreter for shell scripts under test that starts without importing torch again.

The benchmark scripts start a dozen Python processes each, and every one of them spends seconds
importing torch, timm and segmentation_models_pytorch before doing a fraction of a second of work
on tiny data. :func:`warm_python` starts one server that imports those libraries once, and returns
the path of a small executable to pass as the scripts' ``PYTHON``. Each call of it forks the
server; the child takes the caller's arguments, working directory, environment and standard
streams, runs ``-m MODULE``, ``-c CODE``, ``-`` (code on stdin) or ``SCRIPT`` as ``python`` would,
and its exit status becomes the caller's.

polypseg itself is never imported by the server: each child imports it fresh, under the caller's
environment, as a new interpreter would. Only the heavy third-party libraries are shared; the
test suite already runs polypseg in one warm interpreter (pytest's) everywhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Imported once by the server: the libraries that make a fresh polypseg process slow to start.
PRELOAD = (
    "torch",
    "torchvision",
    "timm",
    "segmentation_models_pytorch",
    "matplotlib.pyplot",
    "onnx",
    "onnxruntime",
    "sklearn.metrics",  # the exact AUC of every CV and evaluation (0.7 s to import)
    "scipy.ndimage",
    "PIL.Image",
    "rich.progress",
    "typer",
)
_MAX_REQUEST = 1 << 20


# The client (the executable a script calls): standard library only, run with -S -E, so it starts at once.
def _client(address: str, argv: list[str]) -> int:
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(address)
        socket.send_fds(conn, [len(request).to_bytes(8, "big")], [0, 1, 2])
        conn.sendall(request)
        reply = b""
        while chunk := conn.recv(64):
            reply += chunk
    if not reply:
        print("warm python: the process ended without an exit status (killed?)", file=sys.stderr)
        return 1
    return int(reply)


# The server and its children.
def _serve(address: str) -> None:
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)
    listener.settimeout(0.5)
    print("ready", flush=True)
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:  # reap the children that have finished
                pass
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        header, fds, _, _ = socket.recv_fds(conn, 8, 3)
        size = int.from_bytes(header, "big")
        request = b""
        while len(request) < size:
            request += conn.recv(min(_MAX_REQUEST, size - len(request)))
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            code = 1
            try:  # whatever happens, the child never returns to the server's loop
                listener.close()
                code = _run_child(json.loads(request), fds)
                conn.sendall(str(code).encode())
            finally:
                os._exit(code)
        conn.close()
        for fd in fds:
            os.close(fd)


def _run_child(request: dict, fds: list[int]) -> int:
    import atexit
    import io
    import runpy
    import traceback
    import types

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "torch" in sys.modules and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        mode, target, args = _parse(request["argv"])
        python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        base = [p for p in sys.path[1:] if p not in _SERVER_PYTHONPATH]
        first = {"-m": os.getcwd(), "-c": "", "-": ""}.get(mode, str(Path(target).resolve().parent))
        sys.path[:] = [first, *python_path, *base]
        if mode == "-m":
            sys.argv = [target, *args]  # runpy puts the module's file in argv[0]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif mode in ("-c", "-"):
            sys.argv = [mode, *args]
            code = target if mode == "-c" else sys.stdin.read()
            main = sys.modules["__main__"] = types.ModuleType("__main__")
            exec(compile(code, "<string>" if mode == "-c" else "<stdin>", "exec"), main.__dict__)
        else:
            sys.argv = [target, *args]
            runpy.run_path(target, run_name="__main__")
        status = 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            status = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001 - as the interpreter does: print the traceback, exit 1
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    return status


def _parse(argv: list[str]) -> tuple[str, str, list[str]]:
    """``python``'s command line, the forms scripts use: (``-m``/``-c``/``-``/``script``, target, args)."""
    if not argv:
        raise SystemExit("warm python: an interactive interpreter is not supported")
    if argv[0] in ("-m", "-c"):
        if len(argv) < 2:
            raise SystemExit(f"warm python: {argv[0]} needs an argument")
        return argv[0], argv[1], argv[2:]
    if argv[0] == "-":
        return "-", "", argv[1:]
    if argv[0].startswith("-"):
        raise SystemExit(f"warm python: option {argv[0]} is not supported")
    return "script", argv[0], argv[1:]


_SERVER_PYTHONPATH = {p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}


@contextlib.contextmanager
def warm_python(folder: Path, env: dict[str, str] | None = None) -> Iterator[Path]:
    """Start a server under ``env`` (default: this process's); yield the executable to use as ``PYTHON``.

    The server's ``PYTHONPATH`` should be the one the scripts give their Python (children rebuild
    ``sys.path`` from their own, but modules the server preloaded come from where it found them).
    """
    folder.mkdir(parents=True, exist_ok=True)
    # A short path: a Unix socket's address is limited to about 100 bytes.
    address = os.path.join(tempfile.mkdtemp(prefix="warm-py-"), "s")
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", address],
        env=env if env is not None else dict(os.environ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if server.stdout is None or server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"warm python server did not start (exit {server.poll()})")
        executable = folder / "python"
        executable.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S -E "{__file__}" --client "{address}" "$@"\n')
        executable.chmod(0o755)
        yield executable
    finally:
        server.kill()
        server.wait()
        with contextlib.suppress(OSError):
            os.unlink(address)
            os.rmdir(os.path.dirname(address))


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        _serve(sys.argv[2])
    elif sys.argv[1] == "--client":
        sys.exit(_client(sys.argv[2], sys.argv[3:]))
