"""Build the bundled Kvasir-SEG sample (40 resized pairs) deterministically.

Usage: python scripts/make_sample.py [SRC] [TEST_LIST] [OUT]

Defaults (relative to the repository): SRC=../shared/datasets/kvasir-seg,
TEST_LIST=../shared/datasets/splits/pranet_kvasir_test100.txt,
OUT=src/polypseg/data/sample_data/kvasir-seg-sample

The pairs are drawn from PraNet's 100 Kvasir-SEG test images only, which the shipped model never
trained on, so the scores that `polypseg explain` reports on the sample are honest.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

N_PAIRS = 40
SEED = 0
LONG_SIDE = 256
JPEG_QUALITY = 90

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "datasets" / "kvasir-seg"
DEFAULT_TEST_LIST = REPO.parent / "shared" / "datasets" / "splits" / "pranet_kvasir_test100.txt"
DEFAULT_OUT = REPO / "src" / "polypseg" / "data" / "sample_data" / "kvasir-seg-sample"

NOTICE = f"""\
# Kvasir-SEG sample

This folder holds a small subset of **Kvasir-SEG**: {N_PAIRS} image/mask pairs out of the
1000 in the official release, resized so that the longer side is {LONG_SIDE} px. It is
bundled only so that demos and tests run without downloading the full dataset.

All {N_PAIRS} come from the 100 images of PraNet's Kvasir-SEG test split, which polypseg's
shipped model never saw in training, so its scores on this sample are held-out scores.

## Terms and citation

Kvasir-SEG may be used for **research and education only**. Any use must cite:

> Debesh Jha, Pia H. Smedsrud, Michael A. Riegler, Pål Halvorsen, Thomas de Lange,
> Dag Johansen and Håvard D. Johansen. "Kvasir-SEG: A Segmented Polyp Dataset".
> In: MultiMedia Modeling (MMM 2020), Lecture Notes in Computer Science, vol. 11962,
> Springer, 2020, pp. 451-462.

Official download: https://datasets.simula.no/downloads/kvasir-seg.zip
(`polypseg` can fetch and verify it; see `polypseg.data.download`).

## How this sample was made

Built by `scripts/make_sample.py` from the official release (deterministic):

- stems: the 100 stems of PraNet's test list (`splits/pranet_kvasir_test100.txt`) sorted, then
  `random.Random({SEED}).sample(stems, {N_PAIRS})`;
- images: resized with Pillow LANCZOS so the longer side is {LONG_SIDE} px (aspect ratio
  kept), saved as `images/<stem>.jpg`, JPEG quality {JPEG_QUALITY};
- masks: the original JPEG masks converted to one channel (`L`), binarized at > 127 at
  full resolution, then resized with NEAREST to the image's new size and saved as
  `masks/<stem>.png` (8-bit, values 0 and 255 only).

Because of the resizing and re-encoding, scores measured on this sample are not comparable
with published Kvasir-SEG results.
"""


def new_size(w: int, h: int) -> tuple[int, int]:
    """Size with the longer side scaled to LONG_SIDE, aspect ratio kept."""
    scale = LONG_SIDE / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def choose_stems(test_list: Path) -> list[str]:
    """The reproducible subset of stems (seeded choice from the sorted test stems)."""
    stems = sorted({line.strip() for line in test_list.read_text().splitlines() if line.strip()})
    return sorted(random.Random(SEED).sample(stems, N_PAIRS))


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SRC
    test_list = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_TEST_LIST
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else DEFAULT_OUT
    for sub in ("images", "masks"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    for stem in choose_stems(test_list):
        with Image.open(src / "images" / f"{stem}.jpg") as im:
            im = im.convert("RGB")
            size = new_size(*im.size)
            im.resize(size, Image.LANCZOS).save(out / "images" / f"{stem}.jpg", quality=JPEG_QUALITY)
        with Image.open(src / "masks" / f"{stem}.jpg") as m:
            # Binarize before resizing: JPEG masks hold in-between values.
            binary = (np.asarray(m.convert("L")) > 127).astype(np.uint8) * 255
        Image.fromarray(binary).resize(size, Image.NEAREST).save(out / "masks" / f"{stem}.png", optimize=True)
    (out / "NOTICE.md").write_text(NOTICE, encoding="utf-8")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {N_PAIRS} pairs to {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
