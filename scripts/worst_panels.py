"""Stack the panels of the N lowest-Dice images of a `polypseg explain --masks` output into one JPEG.

Usage: python scripts/worst_panels.py EXPLAIN_OUT OUT.jpg [--n 6] [--width 1400]

The model card's failure figure: `polypseg explain` writes one panel per image (image, ground
truth, prediction with the truth dashed, Grad-CAM) and metrics.csv; this picks the worst with the
gallery's one case selection (`polypseg.explain.gallery.select_cases`) and stacks them, worst first.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("explain_out", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--width", type=int, default=1400, help="Width of the stacked image, px.")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality.")
    args = parser.parse_args()

    from PIL import Image

    from polypseg.explain.gallery import select_cases

    with (args.explain_out / "metrics.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["has_ground_truth"].lower() in ("true", "1")]
    scores = [float(r["dice"]) if r["dice"] not in ("", "nan") else math.nan for r in rows]
    worst = select_cases(scores, [r["stem"] for r in rows], args.n)["worst"]
    panels = []
    for index in worst:
        panel = Image.open(args.explain_out / f"{rows[index]['stem']}_panel.png").convert("RGB")
        height = round(panel.height * args.width / panel.width)
        panels.append(panel.resize((args.width, height), Image.LANCZOS))
        print(f"{rows[index]['stem']}: Dice {scores[index]:.3f}")
    sheet = Image.new("RGB", (args.width, sum(p.height for p in panels)), "white")
    top = 0
    for panel in panels:
        sheet.paste(panel, (0, top))
        top += panel.height
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, quality=args.quality, optimize=True)
    print(f"{args.out}: {len(panels)} panels, {args.out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
