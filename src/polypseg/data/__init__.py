"""Data: polyp datasets on disk, the decoded-image cache, splits, augmentation and input files.

Modules: ``datasets`` (layouts, pairing by stem, checks, the cache), ``splits`` (seeded folds and the
inner validation split), ``transforms`` (uint8 image -> model input, one rule for every caller),
``augment`` (batched augmentation on tensors), ``download`` (verified downloads), ``inputs`` (the input
files of ``predict``/``explain``: one rule for bad files), ``manifests/``, ``sample_data/`` (the bundled
sample).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polypseg._lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    "index_dataset": "polypseg.data.datasets",
    "check_dataset": "polypseg.data.datasets",
    "read_image": "polypseg.data.datasets",
    "read_mask": "polypseg.data.datasets",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves the names
    from polypseg.data.datasets import check_dataset as check_dataset
    from polypseg.data.datasets import index_dataset as index_dataset
    from polypseg.data.datasets import read_image as read_image
    from polypseg.data.datasets import read_mask as read_mask
