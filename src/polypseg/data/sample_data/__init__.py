"""Small bundled data sample (40 resized Kvasir-SEG pairs; see its NOTICE.md)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SAMPLE_NAME = "kvasir-seg-sample"


def sample_dataset_path() -> Path:
    """Folder of the bundled Kvasir-SEG sample (``images/*.jpg``, ``masks/*.png``)."""
    # Package data is installed as plain files (no zipimport), so a real Path exists.
    return Path(str(files(__name__) / SAMPLE_NAME))
