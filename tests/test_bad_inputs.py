"""Bad inputs for ``polypseg predict`` and ``polypseg explain``: one rule, no tracebacks, nothing lost.

Every input class below is given to both commands next to two good images, in one run per command
(so the whole matrix stays quick), and once more alone. The rule (polypseg.data.inputs):

* a class that cannot be used is skipped and named on exactly one line, with its cause, and listed
  in skipped.csv; the run exits 0 because the good images were done, and their outputs are the
  same as in a run without the bad inputs; alone, it exits non-zero with a one-line error;
* a class that is merely unusual (16-bit, CMYK, a file name that is not UTF-8, ...) just works;
* nothing prints a traceback.

The other inputs with one rule each are here too: a checkpoint's sidecar (every bad value, in the
weights file and in an older checkpoint's .json, for predict, explain and export), a run's
summary and an ONNX sidecar (polypseg.core.rules), a dataset folder (train and cv refuse what
data check calls an error), a data-cache entry, and the folders predict searches recursively.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from polypseg.core.io_utils import display_name, safe_stem

from helpers import QUICK_ENCODER, copy_into_folds, save_tiny_checkpoint

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# Builders: each makes one input inside `folder` and returns the path to pass on the command line


def _rgb(height: int = 30, width: int = 40) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray | Image.Image, **kwargs) -> Path:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    image.save(path, **kwargs)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(48, 48)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_bytes(array: np.ndarray | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(24, 24) if array is None else array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header declares ``width x height`` (a 'decompression bomb' shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _symlink(path: Path, target: Path | str) -> Path:
    path.symlink_to(target)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _unreadable(path: Path) -> Path:
    _save(path, _rgb())
    path.chmod(0)
    return path


def _folder_with(folder: Path, name: str, make: Callable[[Path], Path]) -> Path:
    """``folder`` (named after its case) holding one entry made by ``make(folder / name)``: the input."""
    make(folder / name)
    return folder


def _exif_rotated(path: Path) -> Path:
    image = Image.fromarray(_rgb(30, 44))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW
    image.save(path, exif=exif.tobytes())
    return path


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Path]  # builds the input under the given folder; returns what to pass
    works: bool  # True: processed like any image; False: skipped with `cause`
    cause: str = ""  # a word of the one-line message (for skips)
    shown: str = ""  # the name the message shows (default: the made path's name)
    commands: tuple[str, ...] = ("predict", "explain")
    needs_non_root: bool = False


NON_UTF8 = os.fsdecode(b"bad\xff\xfe.jpg")

CASES = [
    # --- cannot be used: skipped and named, with the cause
    Case("zero_byte", lambda d: _bytes(d / "empty.jpg", b""), False, "cannot decode"),
    Case("truncated_jpeg", lambda d: _bytes(d / "cut.jpg", _jpeg_bytes()[:300]), False, "truncated"),
    Case("truncated_png", lambda d: _bytes(d / "halfpng.png", _png_bytes()[:60]), False, "cannot decode"),
    Case("text_as_png", lambda d: _bytes(d / "notes.png", b"just some text\n" * 20), False, "cannot decode"),
    Case(
        "random_bytes_jpg",
        lambda d: _bytes(d / "noise.jpg", RNG.integers(0, 256, 4000, dtype=np.uint8).tobytes()),
        False,
        "cannot decode",
    ),
    Case(
        "html_as_jpg",
        lambda d: _bytes(d / "page.jpg", b"<!doctype html><html><body>404</body></html>"),
        False,
        "cannot decode",
    ),
    Case("corrupt_bmp", lambda d: _bytes(d / "bad.bmp", b"BM" + b"\x00" * 40), False, "cannot decode"),
    Case(
        "corrupt_webp", lambda d: _bytes(d / "bad.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 garbage"), False, "cannot decode"
    ),
    Case("corrupt_tiff", lambda d: _bytes(d / "bad.tif", b"II*\x00" + b"\xff" * 60), False, "cannot decode"),
    Case("huge_declared_png", lambda d: _bytes(d / "huge.png", _png_header(10_000, 10_000)), False, "over the limit"),
    Case("bomb_declared_png", lambda d: _bytes(d / "bomb.png", _png_header(60_000, 60_000)), False, "far more than"),
    Case("gif", lambda d: _save(d / "anim.gif", _rgb()), False, "not an image"),
    Case("text_file", lambda d: _bytes(d / "readme.txt", b"hello"), False, "not an image"),
    Case("no_extension", lambda d: _bytes(d / "noext", _png_bytes()), False, "not an image"),
    Case("corrupt_video", lambda d: _bytes(d / "clip.mp4", b"\x00\x00\x00\x18ftypmp42 not really"), False, "video"),
    Case("missing", lambda d: d / "absent.png", False, "not found"),
    Case("missing_parent", lambda d: d / "nowhere" / "x.png", False, "not found"),
    Case("broken_symlink", lambda d: _symlink(d / "dangling.png", d / "gone.png"), False, "broken symlink"),
    Case("symlink_loop", lambda d: _symlink(d / "self.png", d / "self.png"), False, "symlink loop"),
    Case(
        "symlink_cycle",
        lambda d: (_symlink(d / "b.png", d / "a.png"), _symlink(d / "a.png", d / "b.png"))[1],
        False,
        "symlink loop",
    ),
    Case("fifo", lambda d: _fifo(d / "pipe.png"), False, "not a regular file"),
    Case("unreadable", lambda d: _unreadable(d / "secret.png"), False, "permission denied", needs_non_root=True),
    Case("empty_folder", lambda d: (d / "void-folder").mkdir() or d / "void-folder", False, "no image"),
    Case("folder_of_notes", lambda d: _folder_with(d, "notes.txt", lambda p: _bytes(p, b"x")), False, "no image"),
    Case("folder_named_jpg", lambda d: (d / "album.jpg").mkdir() or d / "album.jpg", False, "no image"),
    Case(
        "folder_inside_named_png",
        lambda d: _folder_with(d, "sub.png", lambda p: p.mkdir() or p),
        False,
        "a folder named like an image",
        shown="sub.png",
    ),
    Case(
        "broken_symlink_in_folder",
        lambda d: _folder_with(d, "dead.jpg", lambda p: _symlink(p, p.parent / "missing.jpg")),
        False,
        "broken symlink",
        shown="dead.jpg",
    ),
    Case(
        "gif_in_folder",
        lambda d: _folder_with(d, "still.gif", lambda p: _save(p, _rgb())),
        False,
        "gif is not a supported format",
        shown="still.gif",
    ),
    Case(
        "corrupt_in_folder",
        lambda d: _folder_with(d, "broken.jpg", lambda p: _bytes(p, b"\xff\xd8\xff\xe0 nope")),
        False,
        "cannot decode",
        shown="broken.jpg",
    ),
    # --- unusual but fine: processed like any image
    Case("rgba", lambda d: _save(d / "rgba.png", RNG.integers(0, 256, (30, 40, 4), dtype=np.uint8)), True),
    Case("grayscale", lambda d: _save(d / "gray.png", RNG.integers(0, 256, (30, 40), dtype=np.uint8)), True),
    Case(
        "gray16",
        lambda d: _save(d / "gray16.png", Image.fromarray(RNG.integers(0, 65535, (30, 40), dtype=np.uint16))),
        True,
    ),
    Case("palette", lambda d: _save(d / "palette.png", Image.fromarray(_rgb()).convert("P")), True),
    Case(
        "palette_transparent",
        lambda d: _save(d / "ptrans.png", Image.fromarray(_rgb()).convert("P"), transparency=0),
        True,
    ),
    Case("gray_alpha", lambda d: _save(d / "la.png", Image.fromarray(_rgb()).convert("LA")), True),
    Case("bilevel", lambda d: _save(d / "bits.png", Image.fromarray(_rgb()).convert("1")), True),
    Case("cmyk_jpeg", lambda d: _save(d / "cmyk.jpg", Image.fromarray(_rgb()).convert("CMYK")), True),
    Case("exif_rotated", lambda d: _exif_rotated(d / "rotated.jpg"), True),
    Case("webp", lambda d: _save(d / "frame.webp", _rgb()), True),
    Case("tiff_rgb", lambda d: (tifffile.imwrite(d / "cvc.tif", _rgb(28, 36)), d / "cvc.tif")[1], True),
    Case(
        "tiff_16bit",
        lambda d: (
            tifffile.imwrite(d / "deep.tiff", RNG.integers(0, 65535, (28, 36, 3), dtype=np.uint16)),
            d / "deep.tiff",
        )[1],
        True,
    ),
    Case(
        "tiff_float",
        lambda d: (tifffile.imwrite(d / "float.tif", RNG.random((28, 36)).astype(np.float32)), d / "float.tif")[1],
        True,
    ),
    Case("one_pixel", lambda d: _save(d / "dot.png", _rgb(1, 1)), True),
    Case("uniform_black", lambda d: _save(d / "black.png", np.zeros((30, 40, 3), np.uint8)), True),
    Case("png_named_jpg", lambda d: _bytes(d / "actually-png.jpg", _png_bytes()), True),
    Case("upper_case_extension", lambda d: _save(d / "SHOUT.JPG", _rgb(), format="JPEG"), True),
    Case("non_utf8_name", lambda d: _save(d / NON_UTF8, _rgb(), format="JPEG"), True),
    Case("cjk_name", lambda d: _save(d / "息肉.png", _rgb()), True),
    Case("markup_name", lambda d: _save(d / "[bold]x[link].png", _rgb()), True),
    Case("comma_quote_name", lambda d: _save(d / 'a, "b".png', _rgb()), True),
    Case(
        "leading_dash_name", lambda d: _folder_with(d, "-dash.png", lambda p: _save(p, _rgb())), True, shown="-dash.png"
    ),
    Case("long_name", lambda d: _save(d / ("x" * 200 + ".png"), _rgb()), True),
]
CASE_IDS = [case.name for case in CASES]
assert len(CASES) >= 40


def _applicable(case: Case, command: str) -> bool:
    return command in case.commands and not (case.needs_non_root and IS_ROOT)


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny model, two good images, every case built once, one run per command


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory: pytest.TempPathFactory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded 2-core machine: avoid oversubscription stalls
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYPSEG_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same U-Net on a 0.2M-parameter encoder: the sidecar matrix writes a copy of it 100 times."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("small_model"), encoder=QUICK_ENCODER)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    _save(folder / "good1.png", _rgb(36, 52))
    _save(folder / "good2.jpg", _rgb(40, 30), format="JPEG")
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Each case's input path and the name its message must show."""
    root = tmp_path_factory.mktemp("cases")
    made = {}
    for case in CASES:
        folder = root / case.name
        folder.mkdir()
        path = case.make(folder)
        made[case.name] = (path, case.shown or path.name)
    yield made
    for case in CASES:  # let pytest clean up
        if case.needs_non_root:
            for path in (root / case.name).iterdir():
                path.chmod(0o644)


def _args(command: str, inputs: list[Path], model: Path, out: Path) -> list[str]:
    args = [command, *map(str, inputs), "--model", str(model), "--out", str(out), "--device", "cpu"]
    if command == "predict":
        return args + ["--backend", "torch"]
    return args + ["--deletion-steps", "0", "--no-gallery"]


def _run(args: list[str]) -> tuple[int, str]:
    """Run the CLI as a user would (``polypseg.cli.main.main``: user errors as one line, exit codes)."""
    import contextlib

    from polypseg.cli.main import main

    captured = io.StringIO()
    old_argv = sys.argv
    sys.argv = ["polypseg", *args]
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            try:
                main()
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    finally:
        sys.argv = old_argv
    return code, captured.getvalue()


def _lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(model: Path, good: Path, built: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per command: a run of the good images alone, and one with every applicable case beside them."""
    result = {}
    for command in ("predict", "explain"):
        inputs = [path for case in CASES if _applicable(case, command) for path in [built[case.name][0]]]
        reference_out = tmp_path_factory.mktemp(f"{command}-reference")
        mixed_out = tmp_path_factory.mktemp(f"{command}-mixed")
        reference = _run(_args(command, [good], model, reference_out))
        mixed = _run(_args(command, [good, *inputs], model, mixed_out))
        result[command] = {"reference": reference, "mixed": mixed, "reference_out": reference_out, "out": mixed_out}
    return result


def _skipped_rows(out: Path) -> list[dict[str, str]]:
    path = out / "skipped.csv"
    return list(csv.DictReader(path.open(encoding="utf-8"))) if path.is_file() else []


def _done_names(command: str, out: Path) -> list[str]:
    table = "predictions.csv" if command == "predict" else "metrics.csv"
    column = "file" if command == "predict" else "image"
    return [Path(row[column]).name for row in csv.DictReader((out / table).open(encoding="utf-8"))]


# ---------------------------------------------------------------------------------------------
# The matrix


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_good_files_are_done_and_unchanged_beside_every_bad_input(command: str, runs: dict) -> None:
    run = runs[command]
    code, output = run["mixed"]
    assert code == 0, output
    assert "Traceback" not in output and "UserWarning" not in output and "Glyph" not in output
    reference, mixed = run["reference_out"], run["out"]
    for stem in ("good1", "good2"):
        if command == "predict":
            a = np.asarray(Image.open(reference / "masks" / f"{stem}.png"))
            b = np.asarray(Image.open(mixed / "masks" / f"{stem}.png"))
        else:
            a, b = np.load(reference / f"{stem}_heatmap.npy"), np.load(mixed / f"{stem}_heatmap.npy")
        np.testing.assert_array_equal(a, b)
    # the closing line counts what was skipped, by cause
    last = _lines(output)[-1]
    skipped = len(_skipped_rows(mixed))
    assert f"{skipped} input(s) skipped" in last and "skipped.csv" in last, last


@pytest.mark.parametrize("command", ["predict", "explain"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_each_input_class(case: Case, command: str, runs: dict, built: dict) -> None:
    if not _applicable(case, command):
        pytest.skip("root reads any file" if case.needs_non_root else f"not an input of {command}")
    code, output = runs[command]["mixed"]
    out = runs[command]["out"]
    path, shown = built[case.name]
    shown_text = display_name(shown)
    assert code == 0 and "Traceback" not in output
    mentioning = [line for line in _lines(output) if shown_text in line and "warning:" in line]
    skipped = [row for row in _skipped_rows(out) if Path(row["file"]).name == shown_text]
    if case.works:
        assert mentioning == [] and skipped == [], mentioning or skipped
        assert shown_text in _done_names(command, out)
        stem = safe_stem(Path(shown).stem)
        written = out / "masks" / f"{stem}.png" if command == "predict" else out / f"{stem}_heatmap.npy"
        assert written.is_file(), sorted(p.name for p in out.rglob("*"))
        if command == "predict":
            with Image.open(written) as mask:
                assert mask.size[0] >= 1 and set(np.unique(np.asarray(mask))) <= {0, 255}
    else:
        cause = "not an image" if case.name == "corrupt_video" and command == "explain" else case.cause
        assert len(mentioning) == 1, output  # named once, on one line ...
        assert cause in mentioning[0].lower(), mentioning[0]  # ... with its cause
        assert len(skipped) == 1 and skipped[0]["reason"]
        assert shown_text not in _done_names(command, out)


@pytest.mark.parametrize("command", ["predict", "explain"])
@pytest.mark.parametrize("case", [c for c in CASES if not c.works], ids=[c.name for c in CASES if not c.works])
def test_a_bad_input_alone_exits_non_zero_with_one_line(
    case: Case, command: str, model: Path, built: dict, tmp_path: Path
) -> None:
    if not _applicable(case, command):
        pytest.skip("root reads any file" if case.needs_non_root else f"not an input of {command}")
    path, shown = built[case.name]
    code, output = _run(_args(command, [path], model, tmp_path / "out"))
    assert code in (1, 2), output
    assert "Traceback" not in output
    errors = [line for line in _lines(output) if line.startswith("error:")]
    assert len(errors) == 1, output
    assert display_name(shown) in output


# ---------------------------------------------------------------------------------------------
# Ground truth next to the images (explain)


def test_explain_masks_classes(model: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 10:30] = 255
    for stem in ("ok", "nomask", "mismatch", "empty", "noisy", "broken"):
        _save(root / "images" / f"{stem}.png", _rgb())
    _save(root / "masks" / "ok.png", mask)
    _save(root / "masks" / "mismatch.png", np.zeros((10, 10), np.uint8))
    _save(root / "masks" / "empty.png", np.zeros((30, 40), np.uint8))
    _save(root / "masks" / "noisy.jpg", mask, format="JPEG", quality=30)
    _bytes(root / "masks" / "broken.png", b"not a png")
    out = tmp_path / "out"
    code, output = _run(_args("explain", [root], model, out))
    assert code == 0 and "Traceback" not in output, output
    rows = {row["stem"]: row for row in csv.DictReader((out / "metrics.csv").open())}
    assert set(rows) == {"ok", "nomask", "mismatch", "empty", "noisy", "broken"}  # nothing lost
    assert rows["ok"]["has_ground_truth"] == "True" and rows["noisy"]["has_ground_truth"] == "True"
    assert rows["empty"]["has_ground_truth"] == "True"
    for stem in ("nomask", "mismatch", "broken"):
        assert rows[stem]["has_ground_truth"] == "False" and rows[stem]["dice"] == ""
    assert sum("mismatch.png" in line and "warning:" in line for line in _lines(output)) == 1
    assert sum("broken.png" in line and "warning:" in line for line in _lines(output)) == 1
    assert "--masks" in output  # says how to give ground truth for the image without one


def test_explain_an_image_beside_a_masks_folder_uses_it(model: Path, tmp_path: Path) -> None:
    """``explain DIR/images/x.jpg`` once showed nan metrics although DIR/masks/x.png exists."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    _save(root / "images" / "x.jpg", _rgb(), format="JPEG")
    mask = np.zeros((30, 40), np.uint8)
    mask[5:25, 5:30] = 255
    _save(root / "masks" / "x.png", mask)
    out = tmp_path / "out"
    code, output = _run(_args("explain", [root / "images" / "x.jpg"], model, out) + ["--deletion-steps", "2"])
    assert code == 0, output
    (row,) = csv.DictReader((out / "metrics.csv").open())
    assert row["has_ground_truth"] == "True" and row["dice"] != "" and row["energy_inside"] != ""
    assert "dataset layout" in output
    summary = json.loads((out / "summary.json").read_text())
    assert "insertion_auc" in summary["metric_scales"] and "exceed 1" in summary["metric_scales"]["insertion_auc"]
    assert "insertion_auc" in output and "exceed 1" in output
    assert "explained with the model" in output and summary["model"].startswith("explained with")


def test_explain_says_which_fold_explained(model: Path, tmp_path: Path) -> None:
    run = copy_into_folds(model, tmp_path / "run")
    image = _save(tmp_path / "x.png", _rgb())
    code, output = _run(_args("explain", [image], run, tmp_path / "out"))
    assert code == 0, output
    assert "explained with fold 0's model" in output and "--fold" in output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["fold"] == 0


# ---------------------------------------------------------------------------------------------
# Options and model files


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_out_pointing_at_a_file_is_one_line(command: str, model: Path, good: Path, tmp_path: Path) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code, output = _run(_args(command, [good], model, target))
    assert code == 2 and "Traceback" not in output, output
    (error,) = [line for line in _lines(output) if line.startswith("error:")]
    assert "--out" in error and "results.txt" in error
    assert target.read_text() == "keep me"


def _edit_sidecar(model: Path, folder: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of ``model`` whose metadata says something else, in the format of older versions
    (metadata in the .json only), which a user can edit by hand."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    meta = json.loads(model.with_suffix(".json").read_text())
    edit(meta)
    save_file(load_file(str(model)), str(folder / "best.safetensors"), metadata={"format": meta["format"]})
    (folder / "best.json").write_text(json.dumps(meta))
    return folder / "best.safetensors"


SIDECAR_EDITS = {
    "unknown_arch": (lambda m: m["config"]["model"].update(arch="FancyNet"), "FancyNet"),
    "unknown_encoder": (lambda m: m["config"]["model"].update(encoder="resnet9000"), "resnet9000"),
    "unknown_field": (lambda m: m["config"]["model"].update(bogus=1), "bogus"),
    "no_config": (lambda m: m.pop("config"), "config"),
    "wrong_type": (lambda m: m["config"]["train"].update(image_size="big"), "big"),
    "decoder_channels": (
        lambda m: m["config"]["model"].update(decoder_channels=[16, 8, 8, 8, 8]),
        "decoder.blocks.0.conv1.0.weight",
    ),
}


# Values the command line refuses are refused in a sidecar too (the same rule, polypseg.core.rules):
# a threshold outside (0, 1) gave all-empty or all-polyp masks without a word, and an image size
# that is not a model input size a traceback.
for _value, _id in ((5.0, "5.0"), (-1, "-1"), (0, "0"), (1, "1"), ("high", "high"), (None, "null")):
    SIDECAR_EDITS[f"threshold_{_id}"] = (lambda m, v=_value: m.update(threshold=v), "threshold")
for _value, _id in ((0, "0"), (-1, "-1"), (5.0, "5.0"), (100, "100"), ("high", "high")):
    SIDECAR_EDITS[f"image_size_{_id}"] = (lambda m, v=_value: m["config"]["train"].update(image_size=v), "image_size")


def _edit_embedded_sidecar(model: Path, folder: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of ``model`` whose metadata says something else, in today's format: the sidecar in
    the weights file's header (with the tensors' SHA-256), and its .json copy."""
    from safetensors.torch import load_file

    from polypseg.models.checkpoint import _write_pair, read_metadata

    folder.mkdir()
    meta = {k: v for k, v in read_metadata(model).items() if k != "tensors_sha256"}
    edit(meta)
    return _write_pair(folder / "best", load_file(str(model)), meta)


def _model_args(command: str, good: Path, weights: Path, out: Path) -> list[str]:
    if command == "export":
        return ["export", "--model", str(weights), "--out", str(out / "model.onnx")]
    return _args(command, [good], weights, out)


@pytest.mark.parametrize("command", ["predict", "explain", "export"])
@pytest.mark.parametrize("layout", ["json_only", "embedded"])
@pytest.mark.parametrize("edit", sorted(SIDECAR_EDITS))
def test_bad_checkpoint_sidecar_is_the_one_line_of_a_corrupt_checkpoint(
    command: str, layout: str, edit: str, small_model: Path, good: Path, tmp_path: Path
) -> None:
    change, named = SIDECAR_EDITS[edit]
    make = _edit_sidecar if layout == "json_only" else _edit_embedded_sidecar
    weights = make(small_model, tmp_path / "model", change)
    code, output = _run(_model_args(command, good, weights, tmp_path / "out"))
    assert code == 2 and "Traceback" not in output, output
    (error,) = [line for line in _lines(output) if line.startswith("error:")]
    assert f"cannot load weights {weights}" in error and named in error, error
    assert not list((tmp_path / "out").glob("masks/*.png")) and not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize("value", [5.0, 0, "high"])
def test_bad_threshold_in_a_run_summary_is_one_line(value, model: Path, good: Path, tmp_path: Path) -> None:
    """A CV run folder's summary.json threshold is the ensemble's default: the same rule as a sidecar's."""
    run = tmp_path / "run"
    (run / "fold_0").mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        (run / "fold_0" / f"best{suffix}").write_bytes(model.with_suffix(suffix).read_bytes())
    (run / "summary.json").write_text(json.dumps({"threshold": value}))
    code, output = _run(_args("predict", [good], run, tmp_path / "out"))
    assert code == 2 and "Traceback" not in output, output
    (error,) = [line for line in _lines(output) if line.startswith("error:")]
    assert "summary.json" in error and "threshold" in error and "strictly between 0 and 1" in error, error


def test_bad_threshold_or_size_in_an_onnx_sidecar_is_refused(tmp_path: Path) -> None:
    from polypseg.inference.export import ONNX_FORMAT, onnx_sidecar
    from polypseg.inference.loading import PredictorError, read_onnx_sidecars

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: the sidecar is")
    for field, value in (("threshold", 5.0), ("threshold", "high"), ("image_size", 0)):
        sidecar = {"format": ONNX_FORMAT, "image_size": 64, "threshold": 0.5, field: value}
        onnx_sidecar(model).write_text(json.dumps(sidecar))
        with pytest.raises(PredictorError, match=f"model.onnx: its sidecar's {field} .* is not"):
            read_onnx_sidecars([model], None, None)


def test_sidecar_threshold_follows_the_command_line_rule() -> None:
    """One rule: what --threshold refuses, a sidecar may not carry either."""
    from polypseg.core.rules import threshold_problem

    for value in (0.5, 0.01, 0.99):
        assert threshold_problem(value) is None
    for value in (0, 1, 5.0, -1, float("nan"), float("inf"), "0.5", "high", None, True):
        assert "strictly between 0 and 1" in threshold_problem(value)


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_corrupt_weights_are_the_same_one_line(command: str, model: Path, good: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "best.json").write_bytes(model.with_suffix(".json").read_bytes())
    raw = bytearray(model.read_bytes())
    raw[-100:] = bytes(100)  # tensor bytes changed: the recorded SHA-256 no longer matches
    (folder / "best.safetensors").write_bytes(bytes(raw))
    code, output = _run(_args(command, [good], folder / "best.safetensors", tmp_path / "out"))
    assert code == 2 and "Traceback" not in output, output
    (error,) = [line for line in _lines(output) if line.startswith("error:")]
    assert "cannot load weights" in error and "SHA-256" in error


def test_predict_recursive_never_reads_its_own_outputs(model: Path, tmp_path: Path) -> None:
    """--out inside the input folder: a second run took masks/ and overlays/ as inputs (good1-2.png, ...)."""
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    _save(folder / "good1.png", _rgb())
    _save(folder / "sub" / "good2.png", _rgb())
    args = [
        "predict",
        str(folder),
        "-r",
        "--model",
        str(model),
        "--out",
        str(folder / "predicted"),
        "--backend",
        "torch",
    ]
    for _ in range(2):
        code, output = _run(args)
        assert code == 0 and "Traceback" not in output, output
        assert sorted(_done_names("predict", folder / "predicted")) == ["good1.png", "good2.png"], output
    assert sorted(p.name for p in (folder / "predicted" / "masks").iterdir()) == ["good1.png", "good2.png"]


def test_predict_recursive_names_a_sub_folder_it_cannot_list(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreadable sub-folder was passed over without a word (root reads any folder: simulated there)."""
    folder = tmp_path / "scans"
    (folder / "locked").mkdir(parents=True)
    _save(folder / "good1.png", _rgb())
    _save(folder / "locked" / "hidden.png", _rgb())
    if IS_ROOT:
        real_scandir = os.scandir

        def scandir(path=".", *args):
            if Path(path).name == "locked":
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path, *args)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        (folder / "locked").chmod(0)
    try:
        args = ["predict", str(folder), "-r", "--model", str(model), "--out", str(tmp_path / "out")]
        code, output = _run([*args, "--backend", "torch"])
    finally:
        (folder / "locked").chmod(0o755)
    assert code == 0 and "Traceback" not in output, output
    (line,) = [line for line in _lines(output) if "locked" in line and "warning:" in line]
    assert "permission denied" in line.lower() and "cannot list" in line, line
    assert [row["cause"] for row in _skipped_rows(tmp_path / "out")] == ["permission denied"]
    assert "1 input(s) skipped" in _lines(output)[-1]


def test_predictions_csv_names_the_mask_written_for_each_input(model: Path, tmp_path: Path) -> None:
    """Two inputs with one stem give masks/dup.png and masks/dup-2.png: the CSV says which is which."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _save(tmp_path / folder / "dup.png", _rgb())
    code, output = _run(
        _args("predict", [tmp_path / "a" / "dup.png", tmp_path / "b" / "dup.png"], model, tmp_path / "out")
        + ["--no-progress"]
    )
    assert code == 0, output
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert [(Path(r["file"]).parent.name, r["mask"]) for r in rows] == [
        ("a", "masks/dup.png"),
        ("b", "masks/dup-2.png"),
    ]
    assert all((tmp_path / "out" / r["mask"]).is_file() for r in rows)


def test_only_fold_outside_the_run_names_the_folds(tmp_path: Path) -> None:
    from helpers import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n=4)
    args = ["cv", "--data", str(data), "--out", str(tmp_path / "run"), "--recipe", "demo", "--folds", "2"]
    code, output = _run([*args, "--only-fold", "5"])
    assert code == 2 and "Traceback" not in output, output
    assert [line for line in _lines(output) if line.startswith("error:")] == [
        "error: --only-fold 5: a 2-fold run has folds 0 to 1"
    ]


def test_training_option_help_states_the_rule_that_is_enforced() -> None:
    """--lr's help said x>=0.0 while 0 is refused; --image-size's said x>=32 while 33 is refused."""
    code, output = _run(["train", "--help"])
    assert code == 0 and "x>=0.0" not in output and "x>=32" not in output
    for args, message in ((["--lr", "0"], "train.lr 0.0: must be > 0"), (["--image-size", "48"], "multiple of 32")):
        code, output = _run(["train", "--recipe", "demo", "--out", "unused", *args])
        assert code == 2 and message in output, output


def test_corrupt_weights_are_refused_before_an_export_is_announced(model: Path, good: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    raw = bytearray(model.read_bytes())
    raw[-100:] = bytes(100)
    (folder / "best.safetensors").write_bytes(bytes(raw))
    args = ["predict", str(good), "--model", str(folder / "best.safetensors"), "--out", str(tmp_path / "out")]
    code, output = _run([*args, "--backend", "onnxruntime", "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and "Traceback" not in output, output
    assert "exporting" not in output and "SHA-256" in output, output


@pytest.mark.parametrize("command", ["predict", "explain", "export"])
def test_weights_file_without_its_json_loads_from_the_embedded_sidecar(
    command: str, model: Path, good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    from polypseg.inference import export

    # Reading the sidecar does not depend on the exporter: use the quicker TorchScript one (the
    # torch.export-based one is covered in test_export.py).
    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "best.safetensors").write_bytes(model.read_bytes())  # the readable .json copy is not there
    code, output = _run(_model_args(command, good, folder / "best.safetensors", tmp_path / "out"))
    assert code == 0 and "Traceback" not in output, output
    made = {"predict": "masks/good1.png", "explain": "good1_heatmap.npy", "export": "model.onnx"}[command]
    assert (tmp_path / "out" / made).is_file()


def _gif_mask(root: Path) -> None:
    (root / "masks" / "case00.png").unlink()
    _save(root / "masks" / "case00.gif", np.zeros((40, 48), np.uint8))


DATASET_ERRORS = {
    "gif_mask": (_gif_mask, "GIF is not a supported format"),
    "duplicate_stem": (lambda root: _save(root / "images" / "case01.png", _rgb(40, 48)), "same stem"),
    "unpaired_image": (lambda root: _save(root / "images" / "lonely.jpg", _rgb(40, 48)), "no mask"),
    "unpaired_mask": (lambda root: _save(root / "masks" / "orphan.png", np.zeros((40, 48), np.uint8)), "no image"),
    "folder_named_like_mask": (
        lambda root: (root / "masks" / "case02.png").unlink() or (root / "masks" / "case02.png").mkdir(),
        "a folder",
    ),
}


@pytest.mark.parametrize("problem", sorted(DATASET_ERRORS))
def test_train_and_cv_refuse_what_data_check_calls_an_error(problem: str, tmp_path: Path) -> None:
    """One rule for a dataset folder: train on the pairs that happen to work and a GIF mask or a
    second file with the same stem would be left out without a word."""
    from helpers import write_synthetic_dataset

    make, cause = DATASET_ERRORS[problem]
    root = write_synthetic_dataset(tmp_path / "data", n=4)
    make(root)
    code, output = _run(["data", "check", str(root)])
    assert code == 1 and "Traceback" not in output, output
    (reported,) = [line.strip() for line in _lines(output) if cause in line and not line.startswith("error")]
    for command in ("train", "cv"):
        run = tmp_path / command
        code, output = _run([command, "--data", str(root), "--out", str(run), "--recipe", "demo", "--device", "cpu"])
        assert code == 2 and "Traceback" not in output, output
        (error,) = [line for line in _lines(output) if line.startswith("error:")]
        assert reported in error and "polypseg data check" in error, (reported, error)
        assert not list(run.rglob("history.json")), "trained on data that data check refuses"


def test_a_damaged_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    """Caches are derived data: an entry cut short is made again, not an error that stops training."""
    from polypseg.data.cache import build_cache, cache_path

    from helpers import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "data", n=3)
    first = build_cache(root, 32, cache_dir=tmp_path / "cache", progress=False)
    entry = cache_path(root, 32, tmp_path / "cache")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    again = build_cache(root, 32, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(again.images, first.images)
    assert entry.stat().st_size > 100


def test_a_damaged_cache_file_given_as_data_says_how_to_make_it_again(tmp_path: Path) -> None:
    bad = tmp_path / "data.npz"
    bad.write_bytes(b"PK\x03\x04 cut short")
    code, output = _run(["train", "--data", str(bad), "--out", str(tmp_path / "run"), "--recipe", "demo"])
    assert code == 2 and "Traceback" not in output, output
    (error,) = [line for line in _lines(output) if line.startswith("error:")]
    assert "not a usable polypseg cache" in error and "polypseg data cache" in error, error


def test_npz_with_object_arrays_as_data_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "data.npz"
    np.savez(bad, format=np.array([{"a": 1}], dtype=object))
    code, output = _run(
        ["cv", "--data", str(bad), "--out", str(tmp_path / "run"), "--recipe", "demo", "--device", "cpu"]
    )
    assert code == 2 and "Traceback" not in output, output
    (error,) = [line for line in _lines(output) if line.startswith("error:")]
    assert "data.npz" in error and "not a usable polypseg cache" in error


def test_warnings_are_one_line_not_python_warnings(tmp_path: Path) -> None:
    """A Python warning raised during a command prints as one 'warning:' line, never file:line: UserWarning."""
    import warnings

    from polypseg.data.inputs import one_line_warnings

    seen: list[str] = []
    with one_line_warnings(seen.append):
        warnings.warn("something odd\nsecond line", UserWarning, stacklevel=1)
        warnings.warn(
            "Glyph 24687 (\\N{CJK UNIFIED IDEOGRAPH-606F}) missing from font(s) DejaVu Sans.", UserWarning, stacklevel=1
        )
    assert seen == ["something odd"]


def test_data_check_exit_codes(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    code, output = _run(["data", "check", str(empty)])
    assert code == 1 and "no image/mask pairs" in output and "Traceback" not in output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "images").write_text("a file")
    (broken / "masks").mkdir()
    code, output = _run(["data", "check", str(broken)])
    assert code == 2 and "Traceback" not in output
    (error,) = [line for line in _lines(output) if line.startswith("error:")]
    assert re.search(r"broken/images is not a folder", error), error


def test_explain_with_nothing_explained_prints_no_empty_table(model: Path, tmp_path: Path) -> None:
    """With every input skipped, explain printed a table of empty metrics and their notes before the error."""
    bad = _bytes(tmp_path / "empty.jpg", b"")
    code, output = _run(_args("explain", [bad], model, tmp_path / "out"))
    assert code == 1 and "Traceback" not in output, output
    assert "metric" not in output and "deletion_auc" not in output, output
    assert "0 image(s) explained; 1 input(s) skipped" in output
    assert [line for line in _lines(output) if line.startswith("error:")] == [
        "error: no image could be explained (see the warnings above)"
    ]


def test_predict_option_errors_name_the_option_as_explain_does(model: Path, good: Path, tmp_path: Path) -> None:
    """predict said "precision 'fp16': ..." (no option) and "--fold 1: ... has folds []" for a lone checkpoint."""
    for extra, expected in (
        (["--precision", "fp16"], "error: --precision 'fp16': choose one of auto, fp32, bf16"),
        (["--fold", "1"], f"error: --fold 1: {model.with_suffix('')} is a single checkpoint, not a CV run folder"),
    ):
        code, output = _run(_args("predict", [good], model.with_suffix(""), tmp_path / "out") + extra)
        assert code == 2 and "Traceback" not in output, output
        assert [line for line in _lines(output) if line.startswith("error:")] == [expected], output
    assert not (tmp_path / "out").exists()


def test_evaluate_out_that_is_a_file_is_one_line(model: Path, tmp_path: Path) -> None:
    """An output path that is a file was a FileExistsError traceback after the whole evaluation."""
    from helpers import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n=2)
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    code, output = _run(
        ["evaluate", "--model", str(model), "--data", str(data), "--out", str(blocker), "--no-progress"]
    )
    assert code == 2 and "Traceback" not in output, output
    (error,) = [line for line in _lines(output) if line.startswith("error:")]
    assert str(blocker) in error and "a file stands where a folder is needed" in error
    assert blocker.read_text() == "keep me"


def _mask_file(tmp_path: Path, name: str, pixels: np.ndarray, **save: object) -> Path:
    path = tmp_path / name
    if name.endswith(".tif"):
        tifffile.imwrite(path, pixels)
    else:
        Image.fromarray(pixels).save(path, **save)
    return path


@pytest.mark.parametrize(
    ("name", "values", "save"),
    [
        ("labels01.png", (0, 1), {}),  # a lossless label map: foreground where 1
        ("mask.png", (0, 255), {}),
        ("mask16.png", (0, 255), {"dtype": np.uint16}),  # 16-bit holding 0/255: read as 8-bit
        ("mask.jpg", (0, 255), {"quality": 60}),  # JPEG noise near 0 stays background
        ("noise01.jpg", (0, 1), {"quality": 95}),  # in a JPEG, a 1 is noise, not a label
        ("labels.tif", (0, 1), {}),
    ],
)
def test_web_uploads_read_masks_and_images_as_files_on_disk_are_read(
    tmp_path: Path, name: str, values: tuple[int, int], save: dict
) -> None:
    """One rule per kind of input: a mask or image sent to the web app is the one data check, train
    and explain read from disk, pixel for pixel."""
    from polypseg.data.images import read_image, read_mask
    from polypseg.web.validation import decode_image_bytes, decode_mask_bytes

    dtype = save.pop("dtype", np.uint8)
    pixels = np.full((24, 32), values[0], dtype=dtype)
    pixels[6:18, 8:24] = values[1]
    path = _mask_file(tmp_path, name, pixels, **save)
    from_disk, uploaded = read_mask(path), decode_mask_bytes(path.read_bytes(), name)
    assert np.array_equal(uploaded, from_disk)
    assert from_disk.any() == (values[1] > 1 or not name.endswith(".jpg"))  # the rule is not vacuous
    assert np.array_equal(decode_image_bytes(path.read_bytes(), name), read_image(path))
