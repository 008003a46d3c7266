"""Data: polyp datasets on disk, the decoded-image cache, splits, augmentation and input files.

Modules: ``images`` (reading one image or mask, resizing), ``pairing`` (dataset layouts, pairs matched by
stem), ``check`` (``data check``, the one rule for a dataset folder), ``cache`` (the preprocessed cache),
``datasets`` (those four under one import path), ``splits`` (seeded folds, the inner validation split,
stem lists), ``transforms`` (uint8 image -> model input, one rule for every caller), ``augment`` (batched
augmentation on tensors), ``download`` (verified downloads), ``inputs`` (the input files of
``predict``/``explain``: one rule for bad files), ``manifests/``, ``sample_data/`` (the bundled sample).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polypseg._lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    "index_dataset": "polypseg.data.pairing",
    "check_dataset": "polypseg.data.check",
    "read_image": "polypseg.data.images",
    "read_mask": "polypseg.data.images",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves the names
    from polypseg.data.check import check_dataset as check_dataset
    from polypseg.data.images import read_image as read_image
    from polypseg.data.images import read_mask as read_mask
    from polypseg.data.pairing import index_dataset as index_dataset
