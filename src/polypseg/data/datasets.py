"""Polyp datasets on disk under one import path: reading files, pairing, checks and the cache.

The definitions live in modules by responsibility, and are re-exported here unchanged, so
``from polypseg.data.datasets import read_image`` keeps working:

* :mod:`polypseg.data.images`: reading one image or mask (the pixel rules), resizing, the errors;
* :mod:`polypseg.data.pairing`: a dataset's layout and its image/mask pairs, matched by file stem;
* :mod:`polypseg.data.check`: ``data check`` and the rule that refuses a dataset with errors;
* :mod:`polypseg.data.cache`: the preprocessed cache and a dataset's content fingerprint;
* :func:`polypseg.data.splits.load_split_file`: a list of stems.
"""

from __future__ import annotations

from polypseg.data.cache import (
    CACHE_FORMAT,
    MASK_RULE,
    CachedData,
    build_cache,
    cache_path,
    dataset_fingerprint,
    default_cache_dir,
    load_cache,
    resumed_data,
)
from polypseg.data.check import MIN_CHECK_SIDE, CheckReport, Problem, check_dataset, index_problems, usable_index
from polypseg.data.images import (
    LOSSY_SUFFIXES,
    DataError,
    ImageReadError,
    image_rgb,
    mask_foreground,
    mask_uint8,
    pil_pixels,
    planar_to_last,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
    to_uint8,
)
from polypseg.data.pairing import (
    IMAGE_EXTENSIONS,
    LAYOUTS,
    DatasetIndex,
    Sample,
    find_layout,
    index_dataset,
    unsupported_format,
)
from polypseg.data.splits import load_split_file

__all__ = [
    "CACHE_FORMAT",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "LOSSY_SUFFIXES",
    "MASK_RULE",
    "MIN_CHECK_SIDE",
    "CachedData",
    "CheckReport",
    "DataError",
    "DatasetIndex",
    "ImageReadError",
    "Problem",
    "Sample",
    "build_cache",
    "cache_path",
    "check_dataset",
    "dataset_fingerprint",
    "default_cache_dir",
    "find_layout",
    "image_rgb",
    "index_dataset",
    "index_problems",
    "load_cache",
    "load_split_file",
    "mask_foreground",
    "mask_uint8",
    "pil_pixels",
    "planar_to_last",
    "read_image",
    "read_mask",
    "resize_image",
    "resize_mask",
    "resumed_data",
    "to_uint8",
    "unsupported_format",
    "usable_index",
]
