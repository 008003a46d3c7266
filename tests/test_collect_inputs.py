"""The one input collection of predict and explain (polypseg.data.inputs.collect_inputs): clashes, missing paths, masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polypseg.data.inputs import EMPTY_FOLDER, NOT_FOUND, NOT_IMAGE, NOT_REGULAR, SkipLog, collect_inputs, write_csv
from polypseg.errors import PolypsegError


def _image(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 10, 3), value, np.uint8)).save(path)
    return path


def _mask(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(path)
    return path


def _collect(inputs: list[Path], **options: object) -> tuple[list, SkipLog]:
    warnings: list[str] = []
    skips = SkipLog(warnings.append)
    return collect_inputs(inputs, skips, **options), skips


@pytest.mark.parametrize("options", [{"videos": True, "recursive": False}, {"ground_truth": True}])
def test_name_clashes_get_distinct_names_in_input_order(tmp_path: Path, options: dict) -> None:
    first = _image(tmp_path / "a" / "x.jpg")
    second = _image(tmp_path / "b" / "x.png")
    folder = tmp_path / "c"
    _image(folder / "x.jpg")
    _image(folder / "y.png")
    items, skips = _collect([first, second, folder], **options)
    assert [(item.path, item.name) for item in items] == [
        (first, "x"),
        (second, "x-2"),
        (folder / "x.jpg", "x-3"),
        (folder / "y.png", "y"),
    ]
    assert not skips


@pytest.mark.parametrize("options", [{"videos": True, "recursive": False}, {"ground_truth": True}])
def test_missing_and_unusable_paths_are_skipped_with_their_cause_never_raised(tmp_path: Path, options: dict) -> None:
    good = _image(tmp_path / "good.png")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    (tmp_path / "empty").mkdir()
    items, skips = _collect(
        [tmp_path / "absent.jpg", good, notes, tmp_path / "nowhere" / "x.png", tmp_path / "empty"], **options
    )
    assert [item.path for item in items] == [good]
    causes = [(Path(name).name, cause) for name, cause, _ in skips.entries]
    assert causes == [
        ("absent.jpg", NOT_FOUND),
        ("notes.txt", NOT_IMAGE),
        ("x.png", NOT_FOUND),
        ("empty", EMPTY_FOLDER),
    ]


def test_videos_only_when_asked_and_the_recursive_hint_only_when_offered(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00")
    items, _ = _collect([clip], videos=True)
    assert [(item.name, item.video) for item in items] == [("clip", True)]
    items, skips = _collect([clip])
    assert not items and skips.entries[0][1] == NOT_IMAGE

    nested = tmp_path / "nested"
    _image(nested / "deeper" / "z.png")
    _, offered = _collect([nested], videos=True, recursive=False)
    _, not_offered = _collect([nested], ground_truth=True)
    assert "--recursive" in offered.entries[-1][2] and "--recursive" not in not_offered.entries[-1][2]
    items, _ = _collect([nested], videos=True, recursive=True)
    assert [item.name for item in items] == ["z"]


def test_folders_ignore_hidden_files_and_skip_folders_named_like_images(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    _image(folder / "a.png")
    _image(folder / "._a.png")  # a macOS resource fork, not an image
    (folder / "album.jpg").mkdir()
    items, skips = _collect([folder])
    assert [item.name for item in items] == ["a"]
    assert [(Path(name).name, cause) for name, cause, _ in skips.entries] == [("album.jpg", NOT_REGULAR)]
    items, _ = _collect([folder / "._a.png"])  # named on the command line: used
    assert [item.path.name for item in items] == ["._a.png"]


def test_ground_truth_from_dataset_masks_option_and_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _image(root / "images" / "p1.jpg")
    _image(root / "images" / "p2.jpg")
    _mask(root / "masks" / "p1.png")
    items, _ = _collect([root], ground_truth=True)
    assert [(item.name, item.mask_source) for item in items] == [("p1", "dataset"), ("p2", "")]

    notes: list[str] = []
    skips = SkipLog(lambda message: None)
    items = collect_inputs([root / "images" / "p1.jpg"], skips, ground_truth=True, notify=notes.append)
    assert items[0].mask == root / "masks" / "p1.png" and items[0].mask_source == "layout" and notes

    other = tmp_path / "other-masks"
    _mask(other / "q.png")
    loose = _image(tmp_path / "loose" / "q.jpg")
    items, _ = _collect([loose], ground_truth=True, masks=other)
    assert items[0].mask == other / "q.png" and items[0].mask_source == "--masks"
    with pytest.raises(PolypsegError, match="--masks"):
        _collect([loose], ground_truth=True, masks=loose)


def test_write_csv_fills_missing_and_drops_extra_keys(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    write_csv(path, ("file", "value"), [{"file": "a", "value": 1, "extra": 2}, {"file": "b"}])
    assert path.read_text() == "file,value\na,1\nb,\n"
