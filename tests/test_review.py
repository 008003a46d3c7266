"""The review folder: verdicts and corrected masks survive restarts, never leave the folder, never tear."""

from __future__ import annotations

import csv
import errno
import io
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polypseg.core import io_utils
from polypseg.data.check import check_dataset
from polypseg.data.images import read_mask
from polypseg.data.review import (
    KEEP,
    BadMask,
    BadName,
    NameConflict,
    NotReviewed,
    ReviewError,
    ReviewStore,
    ReviewUnreadable,
    StorageError,
    check_name,
)

SIZE = (40, 52)  # height, width


def jpeg(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(*SIZE, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def disc(cx: int = 26, cy: int = 20, r: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[: SIZE[0], : SIZE[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def save(store: ReviewStore, name: str, mask: np.ndarray, image: bytes | None = b"", **options):
    data = jpeg() if image == b"" else image
    return store.save_correction(name, image=data, image_format="JPEG", image_size=SIZE, mask=mask, **options)


def test_verdicts_and_notes_survive_a_restart(tmp_path: Path):
    store = ReviewStore(tmp_path / "review")
    first = store.set_verdict("case1.jpg", status="needs_correction", note="misses the flat part")
    store.set_verdict("case2.jpg", status="accept")
    again = store.set_verdict("case1.jpg", status="reject")  # a note of None keeps the old note
    assert again.note == "misses the flat part" and again.created == first.created and again.updated

    reopened = ReviewStore(tmp_path / "review")
    assert [(r.file, r.status, r.note) for r in reopened.records()] == [
        ("case1.jpg", "reject", "misses the flat part"),
        ("case2.jpg", "accept", ""),
    ]
    summary = reopened.summary()
    assert (summary.records, summary.accept, summary.reject, summary.needs_correction) == (2, 1, 1, 0)
    with pytest.raises(NotReviewed):
        reopened.get("case3.jpg")
    with pytest.raises(ReviewError, match="invalid status"):
        reopened.set_verdict("case1.jpg", status="maybe")


def test_a_note_saved_alone_keeps_the_stored_verdict(tmp_path: Path):
    store = ReviewStore(tmp_path / "review")
    store.set_verdict("case1.jpg", status="accept")  # say, from another tab
    kept = store.set_verdict("case1.jpg", status=KEEP, note="fine after all")
    assert (kept.status, kept.note) == ("accept", "fine after all")
    fresh = store.set_verdict("case2.jpg", status=KEEP, note="look again")  # no verdict yet
    assert (fresh.status, fresh.note) == (None, "look again")
    assert store.set_verdict("case1.jpg", status=None).status is None  # None still clears it


@pytest.mark.parametrize(
    "name",
    ["", "..", "../x.jpg", "a/b.jpg", "/etc/x.png", "C:\\x.png", "x.png\x00.jpg", ".hidden.jpg", "notes.txt",
     "con.jpg", "LPT1.png", "nul.tar.png", "trailing.jpg ", "x" * 300 + ".jpg"],
)  # fmt: skip
def test_names_that_could_leave_the_folder_are_refused(name: str, tmp_path: Path):
    with pytest.raises(BadName):
        check_name(name)
    store = ReviewStore(tmp_path)
    with pytest.raises(BadName):
        store.set_verdict(name, status="accept")
    with pytest.raises(BadName):
        save(store, name, disc())
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], [".review.lock"])


def test_a_saved_correction_is_a_dataset_that_data_check_accepts(tmp_path: Path):
    store = ReviewStore(tmp_path / "review")
    image = jpeg()
    model = disc(r=6)
    record = save(store, "case1.jpeg", disc(), image=image, model_mask=model, threshold=0.4)
    assert (tmp_path / "review/images/case1.jpeg").read_bytes() == image  # the original bytes
    saved = Image.open(tmp_path / "review/masks/case1.png")
    assert saved.mode == "L" and set(np.unique(np.asarray(saved))) == {0, 255}
    np.testing.assert_array_equal(read_mask(tmp_path / "review/masks/case1.png"), disc())
    inter = int((disc() & model).sum())
    assert record.dice_vs_model == pytest.approx(2 * inter / (disc().sum() + model.sum()), abs=1e-6)
    assert record.corrected and record.threshold == 0.4 and record.mask_area_pixels == int(disc().sum())

    # a second save without the image keeps the stored image and replaces the mask
    save(store, "case1.jpeg", disc(r=4), image=None)
    np.testing.assert_array_equal(read_mask(tmp_path / "review/masks/case1.png"), disc(r=4))
    report = check_dataset(tmp_path / "review")
    assert report.ok and report.pairs == 1, [p.message for p in report.problems]


def test_bad_masks_and_stem_clashes_are_refused(tmp_path: Path):
    store = ReviewStore(tmp_path)
    with pytest.raises(BadMask, match="52x40"):
        save(store, "a.jpg", np.zeros((52, 40), bool))
    with pytest.raises(BadMask, match="boolean"):
        save(store, "a.jpg", disc().astype(np.uint8))
    with pytest.raises(BadMask, match="send the image"):
        save(store, "a.jpg", disc(), image=None)
    save(store, "a.jpg", disc())
    with pytest.raises(NameConflict, match="a.jpg"):
        save(store, "a.png", disc())
    assert not (tmp_path / "images/a.png").exists()


def test_two_writers_of_one_image_never_tear_a_file(tmp_path: Path):
    masks = [disc(cx=14 + 3 * i) for i in range(6)]
    stores = [ReviewStore(tmp_path), ReviewStore(tmp_path)]  # as two server processes on one folder
    save(stores[0], "case.jpg", masks[0])
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for _ in range(3):
                save(stores[i % 2], "case.jpg", masks[i], image=None)
                stores[i % 2].set_verdict("case.jpg", status="needs_correction", note=f"writer {i}")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(masks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    final = read_mask(tmp_path / "masks/case.png")
    assert any(np.array_equal(final, m) for m in masks)  # one writer's whole mask, never a mix
    data = json.loads((tmp_path / "review.json").read_text())
    assert data["records"]["case.jpg"]["note"].startswith("writer ")
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(("code", "reason"), [(errno.ENOSPC, "disk_full"), (errno.EROFS, "read_only")])
def test_a_failed_write_is_a_clear_error_that_keeps_earlier_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
):
    store = ReviewStore(tmp_path)
    save(store, "case.jpg", disc())
    store.set_verdict("case.jpg", status="accept", note="fine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise OSError(code, "simulated")

    monkeypatch.setattr(io_utils.os, "replace", fail)
    with pytest.raises(StorageError) as caught:
        save(store, "case.jpg", disc(r=3), image=None)
    assert caught.value.reason == reason and str(tmp_path) not in str(caught.value)
    with pytest.raises(StorageError):
        store.set_verdict("case.jpg", status="reject")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert store.get("case.jpg").status == "accept"  # memory follows the file, not the failed write


def test_a_second_process_sees_the_first_ones_records(tmp_path: Path):
    first, second = ReviewStore(tmp_path), ReviewStore(tmp_path)
    assert second.records() == []
    first.set_verdict("a.jpg", status="reject", note="blurred")
    assert [(r.file, r.status, r.note) for r in second.records()] == [("a.jpg", "reject", "blurred")]
    second.set_verdict("b.jpg", status="accept")
    assert [r.file for r in first.records()] == ["a.jpg", "b.jpg"]


def test_links_out_of_the_folder_are_never_written_through(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "review"
    root.mkdir()
    (root / "images").symlink_to(outside)
    store = ReviewStore(root)
    with pytest.raises(ReviewError, match="link"):
        save(store, "case.jpg", disc())
    assert list(outside.iterdir()) == []
    # a mask file that is a link to a file outside is not replaced or written through either
    (root / "images").unlink()
    (root / "masks").mkdir()
    target = outside / "precious.png"
    target.write_bytes(b"keep")
    (root / "masks" / "case.png").symlink_to(target)
    with pytest.raises(ReviewError, match="link"):
        save(store, "case.jpg", disc())
    assert target.read_bytes() == b"keep" and (root / "masks" / "case.png").is_symlink()
    assert not (root / "images").exists()


def test_export_csv_json_and_a_zip_that_is_a_dataset(tmp_path: Path):
    store = ReviewStore(tmp_path / "review")
    save(store, "b.jpg", disc(), model_mask=disc(r=7), threshold=0.5)
    store.set_verdict("b.jpg", status="needs_correction", note="=HYPERLINK(1)")
    store.set_verdict("a.jpg", status="accept", note="ok, fine")
    rows = list(csv.DictReader(io.StringIO(store.export_csv())))
    assert [r["file"] for r in rows] == ["a.jpg", "b.jpg"]
    assert rows[1]["note"] == "'=HYPERLINK(1)" and rows[1]["status"] == "needs_correction"
    assert float(rows[1]["dice_vs_model"]) == pytest.approx(store.get("b.jpg").dice_vs_model)
    assert rows[0]["dice_vs_model"] == "" and rows[0]["created"].endswith("Z")
    exported = json.loads(store.export_json())
    assert exported["summary"]["records"] == 2 and exported["summary"]["corrected"] == 1

    with zipfile.ZipFile(io.BytesIO(store.export_zip())) as archive:
        assert sorted(archive.namelist()) == ["images/b.jpg", "masks/b.png", "review.csv", "review.json"]
        archive.extractall(tmp_path / "unpacked")
    report = check_dataset(tmp_path / "unpacked")
    assert report.ok and report.pairs == 1


def test_a_foreign_review_file_is_refused(tmp_path: Path):
    (tmp_path / "review.json").write_text('{"something": "else"}')
    with pytest.raises(ReviewUnreadable, match="not a polypseg review file"):
        ReviewStore(tmp_path)
    for records in ('["a.jpg"]', '{"a.jpg": 3}', '{"a.jpg": {"status": "accept"}}'):  # malformed records
        (tmp_path / "review.json").write_text(f'{{"format": "polypseg-review-v1", "records": {records}}}')
        with pytest.raises(ReviewUnreadable, match="review.json in the review folder is damaged"):
            ReviewStore(tmp_path)
