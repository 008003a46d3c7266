"""Per-image Dice of a scored model, by polyp size and by image brightness (for the model card).

Usage:

    python scripts/dice_by_stratum.py RECORD.json [RECORD.json ...] --data DATASET [--json OUT.json]

RECORD is a score record with per-image Dice (`pranet.json` of `polypseg study pranet` /
scripts/ship_model.py, or `external_*.json` of `polypseg study external`); DATASET is the dataset
it was scored on (its masks give each polyp's size, its images their brightness). Reads the
records, never the model: nothing is scored again. Several records (two models on the same images)
give one table with a column each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None, help="Also write the strata here.")
    args = parser.parse_args()

    from polypseg.data.images import read_image, read_mask
    from polypseg.data.pairing import index_dataset
    from polypseg.metrics.strata import BRIGHTNESS_BINS, POLYP_SIZE_BINS, mean_luma, polyp_fraction, scores_by_stratum

    per_image = [json.loads(path.read_text())["per_image"] for path in args.records]
    stems = [str(stem) for stem in per_image[0]["stems"]]
    if any([str(s) for s in record["stems"]] != stems for record in per_image):
        sys.exit("error: the records score different images; compare records of the same test set")
    samples = {sample.stem: sample for sample in index_dataset(args.data).samples}
    missing = [stem for stem in stems if stem not in samples]
    if missing:
        sys.exit(f"error: {args.data} has no image/mask pair for {len(missing)} scored images (first: {missing[0]})")
    sizes = [polyp_fraction(read_mask(samples[stem].mask)) for stem in stems]
    brightness = [mean_luma(read_image(samples[stem].image)) for stem in stems]

    result: dict[str, dict[str, list[dict]]] = {}
    for path, record in zip(args.records, per_image, strict=True):
        result[str(path)] = {
            "polyp_size": [s.to_json() for s in scores_by_stratum(record["dice"], sizes, POLYP_SIZE_BINS)],
            "brightness": [s.to_json() for s in scores_by_stratum(record["dice"], brightness, BRIGHTNESS_BINS)],
        }
    print(_markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _markdown(result: dict[str, dict[str, list[dict]]]) -> str:
    """One table per stratification: a row per stratum, a column per record (mean Dice and 95% CI)."""
    names = list(result)
    tables = []
    for kind in ("polyp_size", "brightness"):
        rows = [f"| {kind.replace('_', ' ')} | images | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
        for index, stratum in enumerate(result[names[0]][kind]):
            cells = [_cell(result[name][kind][index]) for name in names]
            rows.append(f"| {stratum['label']} | {stratum['images']} | " + " | ".join(cells) + " |")
        tables.append("\n".join(rows))
    return "\n\n".join(tables)


def _cell(stratum: dict) -> str:
    if stratum["images"] == 0:
        return "n/a"
    if stratum["images"] < 2:
        return f"{stratum['mean']:.3f}"
    return f"{stratum['mean']:.3f} ({stratum['ci95_low']:.3f}-{stratum['ci95_high']:.3f})"


if __name__ == "__main__":
    main()
