"""Readers, pairing by stem, dataset check and the preprocessed cache."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from polypseg.data.cache import build_cache, load_cache
from polypseg.data.check import check_dataset
from polypseg.data.images import DataError, ImageReadError, read_image, read_mask, resize_mask
from polypseg.data.pairing import index_dataset
from polypseg.data.sample_data import sample_dataset_path

from helpers import write_synthetic_dataset


def test_pairs_by_stem_not_by_sorted_order(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in ("b", "a", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / f"{stem}.jpg")
    for stem in ("a", "c", "z"):  # 'b' has no mask, 'z' has no image
        Image.new("L", (8, 8)).save(tmp_path / "masks" / f"{stem}.png")
    index = index_dataset(tmp_path)
    assert [(s.stem, s.image.stem, s.mask.stem) for s in index.samples] == [("a", "a", "a"), ("c", "c", "c")]
    assert [p.name for p in index.unpaired_images] == ["b.jpg"]
    assert [p.name for p in index.unpaired_masks] == ["z.png"]


def test_jpeg_like_mask_is_binarised_above_127(tmp_path):
    values = np.array([[0, 100, 127], [128, 200, 255]], dtype=np.uint8)
    rgb = np.repeat(values[:, :, None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[False, False, False], [True, True, True]]


def test_label_masks_are_read_by_their_values_not_their_dtype(tmp_path):
    """0/1 PNG and TIFF label maps, and 0/255 stored in 16 bits, are not empty masks; JPEG noise stays background."""
    labels = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    expected = [[False, True], [True, False]]
    Image.fromarray(labels).save(tmp_path / "zero_one.png")
    assert read_mask(tmp_path / "zero_one.png").tolist() == expected
    tifffile.imwrite(tmp_path / "zero_one.tif", labels.astype(np.uint16))
    assert read_mask(tmp_path / "zero_one.tif").tolist() == expected
    tifffile.imwrite(tmp_path / "wide.tif", labels.astype(np.uint16) * 255)
    assert read_mask(tmp_path / "wide.tif").tolist() == expected
    tifffile.imwrite(tmp_path / "full.tif", labels.astype(np.uint16) * 65535)
    assert read_mask(tmp_path / "full.tif").tolist() == expected
    Image.fromarray(labels).save(tmp_path / "noise.jpg", quality=100)  # values 0/1 in a JPEG: noise
    assert not read_mask(tmp_path / "noise.jpg").any()
    # data check reads them the same way: a 0/1 label map is neither empty nor non-binary
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", (2, 2)).save(root / "images" / "a.png")
    Image.fromarray(labels).save(root / "masks" / "a.png")
    assert [p.kind for p in check_dataset(root).problems if p.kind in ("empty-mask", "non-binary")] == []


def test_image_conversions(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert read_image(tmp_path / "gray.png").shape == (3, 4, 3)
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [10, 20, 30]
    deep = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    Image.fromarray(deep).save(tmp_path / "deep.png")
    converted = read_image(tmp_path / "deep.png")
    assert converted.dtype == np.uint8 and converted.shape == (3, 4, 3)
    assert converted[2, 3, 0] == round(55000 * 255 / 65535)  # scaled by the dtype's range, not per image
    Image.new("P", (4, 4)).save(tmp_path / "palette.png")
    assert read_image(tmp_path / "palette.png").shape == (4, 4, 3)


def test_tiff_read_with_tifffile(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "1.tif", image)
    np.testing.assert_array_equal(read_image(tmp_path / "1.tif"), image)
    mask = np.zeros((6, 7), dtype=np.uint8)
    mask[2:4, 2:5] = 255
    mask[0, 0] = 60  # faint value, as in some CVC-ClinicDB masks
    tifffile.imwrite(tmp_path / "1m.tif", mask)
    assert read_mask(tmp_path / "1m.tif").sum() == 6


def test_corrupt_file_error_names_it(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        read_image(tmp_path / "broken.jpg")


def test_check_reports_each_problem_by_file(tmp_path):
    root = write_synthetic_dataset(tmp_path / "d", n=4)
    (root / "images" / "case00.jpg").write_bytes(b"garbage")  # undecodable
    Image.new("L", (10, 10)).save(root / "masks" / "case01.png")  # size mismatch (and empty)
    Image.new("L", (48, 40)).save(root / "masks" / "orphan.png")  # unpaired mask
    Image.new("L", (40, 48)).save(root / "masks" / "case02.png")  # empty mask, right size
    report = check_dataset(root)
    kinds = {(p.kind, Path(p.path).name) for p in report.problems}
    assert ("undecodable", "case00.jpg") in kinds
    assert ("size-mismatch", "case01.png") in kinds
    assert ("unpaired", "orphan.png") in kinds
    assert ("empty-mask", "case02.png") in kinds
    assert not report.ok
    assert all(Path(p.path).name in p.message for p in report.problems)


def test_check_clean_dataset_is_ok(tmp_path):
    report = check_dataset(write_synthetic_dataset(tmp_path / "d", n=3))
    assert report.ok and report.pairs == 3 and report.min_size == (48, 40)


def test_missing_layout_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="images"):
        index_dataset(tmp_path)
    with pytest.raises(DataError, match="not found"):
        index_dataset(tmp_path / "nope")


def test_nearest_resize_keeps_masks_binary():
    mask = np.zeros((37, 53), dtype=bool)
    mask[5:30, 10:40] = True
    resized = resize_mask(mask, 16)
    assert resized.dtype == bool and resized.shape == (16, 16)
    assert 0 < resized.mean() < 1


def test_cache_round_trip_and_reuse(tmp_path):
    root = write_synthetic_dataset(tmp_path / "d", n=5)
    cache = build_cache(root, 32, cache_dir=tmp_path / "cache", progress=False)
    assert cache.images.shape == (5, 32, 32, 3) and cache.masks.shape == (5, 32, 32)
    assert cache.masks.dtype == bool and cache.masks.any()
    assert cache.original_sizes[0] == (48, 40)
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = build_cache(root, 32, cache_dir=tmp_path / "cache", progress=False)
    assert files[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    np.testing.assert_array_equal(again.masks, cache.masks)
    # the disc is bright in the image and in the mask at the same place
    assert cache.images[0][cache.masks[0]].mean() > cache.images[0][~cache.masks[0]].mean() + 50
    subset = cache.subset(["case03", "case01"])
    assert subset.stems == ["case03", "case01"]
    np.testing.assert_array_equal(subset.masks[0], cache.masks[3])


def test_cache_refuses_pickle(tmp_path):
    np.savez(tmp_path / "bad.npz", format=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"bad\.npz is not a usable polypseg cache: Object arrays") as caught:
        load_cache(tmp_path / "bad.npz")
    assert "\n" not in str(caught.value)
    with pytest.raises(DataError, match="bad.npz"):  # given as --data
        build_cache(tmp_path / "bad.npz", 32)


def test_check_names_real_causes(tmp_path):
    root = write_synthetic_dataset(tmp_path / "d", n=3)
    (root / "images" / "case00.jpg").unlink()
    Image.new("RGB", (40, 48)).save(root / "images" / "case00.gif")  # GIF: not a supported format
    (root / "images" / "case01.jpg").unlink()
    (root / "images" / "case01.jpg").symlink_to(root / "images" / "nowhere.jpg")  # broken symlink
    (root / "masks" / "case02.png").unlink()
    (root / "masks" / "case02.png").symlink_to(root / "masks" / "case02.png")  # loop
    Image.new("RGB", (1, 1)).save(root / "images" / "tiny.png")
    Image.new("L", (1, 1)).save(root / "masks" / "tiny.png")
    report = check_dataset(root)
    text = "\n".join(p.message for p in report.problems)
    assert "case00.gif: GIF is not a supported format" in text
    assert "case01.jpg: broken symlink" in text
    assert "case02.png: symlink loop" in text
    assert "mask has no image with the same stem (its image is unusable, see above)" in text
    assert any(p.kind == "tiny-image" and p.severity == "warning" and "1x1" in p.message for p in report.problems)


def test_check_zero_pairs_is_an_error_and_images_as_a_file_is_named(tmp_path):
    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    report = check_dataset(root)
    assert report.pairs == 0 and not report.ok and report.errors[0].kind == "no-pairs"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "images").write_text("a file")
    (broken / "masks").mkdir()
    with pytest.raises(DataError, match=r"broken/images is not a folder"):
        check_dataset(broken)


def test_bundled_sample_is_valid():
    report = check_dataset(sample_dataset_path())
    assert report.ok and report.pairs == 40


def test_real_cvc_clinicdb_tiffs(shared_dataset):
    index = index_dataset(shared_dataset("cvc-clinicdb-test62"))
    assert len(index.samples) == 62
    image = read_image(index.samples[0].image)
    mask = read_mask(index.samples[0].mask)
    assert image.shape == (288, 384, 3) and mask.shape == (288, 384) and mask.any()


def test_real_kvasir_pairs_by_stem(shared_dataset):
    index = index_dataset(shared_dataset("kvasir-seg"))
    assert len(index.samples) == 1000 and not index.unpaired_images and not index.unpaired_masks
    sample = index.samples[0]
    assert read_mask(sample.mask).shape == read_image(sample.image).shape[:2]


def test_cache_file_can_stand_in_for_the_dataset(tmp_path):
    root = write_synthetic_dataset(tmp_path / "d", n=3)
    from polypseg.data.cache import cache_path

    build_cache(root, 32, cache_dir=tmp_path / "cache", progress=False)
    portable = cache_path(root, 32, tmp_path / "cache")
    direct = build_cache(portable, 32)
    assert direct.stems == ["case00", "case01", "case02"]
    with pytest.raises(DataError, match="--size 64"):
        build_cache(portable, 64)


def test_size_mismatch_reads_the_same_in_check_and_cache(tmp_path):
    root = write_synthetic_dataset(tmp_path / "d", n=3)  # images 40 wide, 48 high
    Image.new("L", (10, 12)).save(root / "masks" / "case01.png")
    (problem,) = [p for p in check_dataset(root).problems if p.kind == "size-mismatch"]
    with pytest.raises(DataError) as info:
        build_cache(root, 32, cache_dir=tmp_path / "cache", progress=False)
    for message in (problem.message, str(info.value)):
        assert "case01.png: mask is 10x12, image is 40x48" in message


def test_datasets_module_still_offers_the_names_it_defined_before_the_split():
    """``polypseg.data.datasets`` re-exports, unchanged, every public name of the modules split out of it."""
    import polypseg.data.datasets as datasets
    from polypseg.data import cache, check, images, pairing, splits

    before_the_split = {
        images: "DataError ImageReadError LOSSY_SUFFIXES to_uint8 pil_pixels planar_to_last read_image image_rgb "
        "mask_uint8 read_mask mask_foreground resize_image resize_mask",
        pairing: "IMAGE_EXTENSIONS LAYOUTS Sample DatasetIndex unsupported_format find_layout index_dataset",
        check: "MIN_CHECK_SIDE Problem CheckReport index_problems usable_index check_dataset",
        cache: "CACHE_FORMAT MASK_RULE CachedData dataset_fingerprint default_cache_dir build_cache cache_path "
        "load_cache resumed_data",
        splits: "load_split_file",
    }
    for home, names in before_the_split.items():
        for name in names.split():
            assert name in datasets.__all__, name
            assert getattr(datasets, name) is getattr(home, name), name
