"""Adapting the shipped model to CVC-ClinicDB from a few dozen corrected frames, split by sequence.

Usage: python scripts/adapt_experiment.py --out runs/adapt-cvc [--data CVC62] [--docs docs/runs/adapt-cvc]

CVC-ClinicDB numbers its frames in video-sequence order (the data set's README gives the ranges);
neighbouring frames show the same polyp. The 62 frames are split two ways, each into a "corrected"
part (its ground truth stands in for a reviewer's masks) and a held-out part:

- by sequence: frames of sequences 1-14 (numbers 1-297) corrected, sequences 15-29 held out;
- at random: the same sizes, seeded, so frames of one sequence land on both sides (leakage);
- select (run only when asked, ``--split select``): within the corrected part only, sequences 1-7
  (numbers 1-151) corrected and sequences 8-14 held out, to choose among fine-tuning settings
  without ever looking at sequences 15-29. Its training sees a folder of links to the frames of
  sequences 1-14 only;
- by_sequence_reverse (run only when asked): the by-sequence split the other way round, sequences
  15-29 corrected and 1-14 held out, so that with ``by_sequence`` every frame is held out once
  (``scripts/adapt_pooled.py`` pools the two).

For each split the shipped model is scored on the held-out part ("before"), then
``polypseg train --recipe adapt --test-list HELD_OUT`` fine-tunes it on the corrected part and
scores the held-out part once at the end ("after"). Both scores come from the same images, the same
cache at the shipped model's input size, precision and function (``predict_with_recipe``). Written: ``OUT/<split>/`` (runs),
``DOCS/results.json`` and ``DOCS/<split>/`` (each run's config, split, history and test metrics;
no weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LAST_FRAME_OF_SEQUENCE_14 = 297  # CVC-ClinicDB README: sequence 14 is frames 278-297
LAST_FRAME_OF_SEQUENCE_7 = 151  # sequence 7 is frames 127-151
MODEL = "kvasir-unet-r34"


def splits(stems: list[str], seed: int = 0) -> dict[str, tuple[list[str], list[str]]]:
    """``{name: (corrected, held_out)}`` for the sequence split and a random split of the same sizes."""
    ordered = sorted(stems, key=int)
    corrected = [s for s in ordered if int(s) <= LAST_FRAME_OF_SEQUENCE_14]
    held_out = [s for s in ordered if int(s) > LAST_FRAME_OF_SEQUENCE_14]
    rng = np.random.default_rng(seed)
    shuffled = [ordered[i] for i in rng.permutation(len(ordered))]
    random_corrected = sorted(shuffled[: len(corrected)], key=int)
    random_held_out = sorted(shuffled[len(corrected) :], key=int)
    select = (
        [s for s in corrected if int(s) <= LAST_FRAME_OF_SEQUENCE_7],
        [s for s in corrected if int(s) > LAST_FRAME_OF_SEQUENCE_7],
    )
    return {
        "by_sequence": (corrected, held_out),
        "random": (random_corrected, random_held_out),
        "select": select,
        "by_sequence_reverse": (held_out, corrected),
    }


def linked_subset(data: Path, stems: list[str], folder: Path) -> Path:
    """A folder in CVC-ClinicDB's layout with links to ``stems``' images and masks only."""
    for sub in ("Original", "Ground Truth"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            link = folder / sub / f"{stem}.tif"
            if not link.is_symlink():
                link.symlink_to((data / sub / f"{stem}.tif").resolve())
    return folder


def score_model(model: Any, data: Path, stems: list[str]) -> tuple[dict[str, Any], str]:
    """Metrics at threshold 0.5 of ``model`` on ``stems`` of ``data`` (with ``per_frame_dice``, stem -> Dice)
    and the numeric precision used,
    evaluated as ``polypseg train`` evaluates its test images under the ``adapt`` recipe (at the
    shipped model's input size, its eval batch, TTA and precision)."""
    from polypseg.core.devices import resolve_device
    from polypseg.core.precision import resolve_precision
    from polypseg.core.recipes import get_recipe
    from polypseg.data.cache import build_cache
    from polypseg.training.adapt import match_init_size
    from polypseg.training.evaluation import evaluate_probabilities
    from polypseg.training.loop import predict_with_recipe

    config = get_recipe("adapt")
    match_init_size(config)  # as polypseg train --recipe adapt does: the shipped model's input size
    train = config.train
    device = resolve_device("cpu")
    train.precision = resolve_precision(train.precision, device)
    test = build_cache(data, train.image_size, progress=False).subset(stems)
    at = evaluate_probabilities(predict_with_recipe(model, test.images, train, device), test.masks, test.stems)
    scores = at.compute()["at"]["0.5"]
    scores["per_frame_dice"] = dict(zip(at.stems, at.per_image(0.5)["dice"].tolist(), strict=True))
    return scores, train.precision


def score_shipped(data: Path, held_out: list[str]) -> dict[str, Any]:
    """Mean Dice and IoU of the shipped model on ``held_out`` (:func:`score_model`), with the precision."""
    from polypseg.models.checkpoint import load_checkpoint
    from polypseg.models.pretrained import resolve_model

    scores, precision = score_model(load_checkpoint(resolve_model(MODEL)).model, data, held_out)
    return {"dice": scores["dice"], "iou": scores["iou"], "precision": precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "cvc-clinicdb-test62")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "runs" / "adapt-cvc")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random split.")
    parser.add_argument(
        "--split",
        choices=("by_sequence", "random", "select", "by_sequence_reverse", "all"),
        default="all",
        help="Run one split only; all = by_sequence and random.",
    )
    parser.add_argument(
        "--train-option",
        action="append",
        default=[],
        help="Extra option passed to polypseg train (repeatable), e.g. --train-option=--batch-size=4.",
    )
    args = parser.parse_args()

    from polypseg.data.pairing import index_dataset

    stems = [sample.stem for sample in index_dataset(args.data).samples]
    args.out.mkdir(parents=True, exist_ok=True)
    args.docs.mkdir(parents=True, exist_ok=True)
    results_path = args.docs / "results.json"
    results: dict[str, object] = {
        "data": args.data.name,
        "model": MODEL,
        "recipe": "adapt",
        "threshold": 0.5,
        "machine": cpu_model(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "splits": {},
    }
    for name, (corrected, held_out) in splits(stems, args.seed).items():
        if args.split != name and (args.split != "all" or name in ("select", "by_sequence_reverse")):
            continue
        test_list = args.out / f"{name}_held_out.txt"
        test_list.write_text("".join(f"{s}\n" for s in held_out))
        before = score_shipped(args.data, held_out)
        data = (
            args.data if name != "select" else linked_subset(args.data, corrected + held_out, args.out / "select_data")
        )
        command = [
            sys.executable, "-m", "polypseg", "train", "--data", str(data), "--test-list", str(test_list),
            "--recipe", "adapt", "--out", str(args.out / name), "--device", "cpu", "--no-progress",
            *args.train_option,
        ]  # fmt: skip
        started = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        (args.docs / f"{name}_train_output.txt").write_text(finished.stdout + finished.stderr)
        if finished.returncode != 0:
            sys.exit(f"error: polypseg train failed for {name}; see {args.docs / f'{name}_train_output.txt'}")
        test = json.loads((args.out / name / "test_metrics.json").read_text())
        after = test["at"]["0.5"]
        if results_path.is_file():  # another invocation may have finished the other split meanwhile
            results["splits"] = {**json.loads(results_path.read_text())["splits"], **results["splits"]}  # type: ignore[dict-item]
        results["splits"][name] = {  # type: ignore[index]
            "corrected": corrected,
            "held_out": held_out,
            "before": before,
            "after": {"dice": after["dice"], "iou": after["iou"]},
            "dice_change": after["dice"] - before["dice"],
            "train_seconds": round(seconds, 1),
            "command": "polypseg train " + " ".join(command[4:]),
        }
        keep_run_records(args.out / name, args.docs / name)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name}: Dice {before['dice']:.4f} -> {after['dice']:.4f} ({seconds / 60:.1f} min)", flush=True)


def keep_run_records(run: Path, docs: Path) -> None:
    """The run's small records (no weights) beside the results."""
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "split.json", "history.json", "test_metrics.json", "best.json"):
        if (run / name).is_file():
            shutil.copyfile(run / name, docs / name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
