"""Ship a trained model: test it once, release it as fp16 into the package, keep its small files.

Usage (after `polypseg train ... --test-list TEST --out TRAIN_DIR` has finished):

    python scripts/ship_model.py TRAIN_DIR NAME [--data KVASIR] [--test-list TEST] [--external CVC]

Steps, each through the library that users have:
1. the PraNet protocol on the held-out test list (`evaluate_pranet`: original resolution, bootstrap
   95% intervals, S-measure & co.) -> TRAIN_DIR/pranet.{json,md};
2. external validation on CVC-ClinicDB-62 (`evaluate_external`) -> TRAIN_DIR/external_*.{json,md};
3. the fp16 release into src/polypseg/models/weights/ (`release_model`), with the training command, the
   data seen and unseen, and the test metrics in its sidecar; its fp16-vs-fp32 Dice change on the
   test images is measured and recorded;
4. the run's small files (config, split, history, metrics; never weights) copied to docs/runs/NAME/.

Nothing here chooses anything on the test images: the recipe, epochs and threshold were fixed
before (the best epoch on the inner validation split of the training images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--data", type=Path, default=SHARED / "kvasir-seg")
    parser.add_argument("--test-list", type=Path, default=SHARED / "splits" / "pranet_kvasir_test100.txt")
    parser.add_argument("--external", type=Path, default=SHARED / "cvc-clinicdb-test62")
    parser.add_argument("--command", default="", help="The training command, recorded in the sidecar.")
    parser.add_argument(
        "--stages",
        default="",
        help="For a fine-tuned model: how its earlier stages were trained, recorded in the sidecar.",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--weights-dir", type=Path, default=None, help="Default: the package's weights/ (a dry run: elsewhere)."
    )
    parser.add_argument("--docs-dir", type=Path, default=REPO / "docs" / "runs", help="Where docs/runs/RECORD/ goes.")
    parser.add_argument(
        "--record", default=None, help="The record folder's name under --docs-dir (default NAME); never overwritten."
    )
    args = parser.parse_args()
    docs = args.docs_dir / (args.record or args.name)
    if docs.exists():
        sys.exit(f"error: {docs} exists: every release keeps its own record; pass --record NEW-NAME")

    from polypseg.core.runs import RunDir
    from polypseg.data.cache import build_cache
    from polypseg.data.splits import load_split_file
    from polypseg.experiments.external import evaluate_external
    from polypseg.experiments.pranet import evaluate_pranet
    from polypseg.models.checkpoint import load_checkpoint
    from polypseg.models.pretrained import release_model
    from polypseg.training.evaluation import evaluate_probabilities, predict_probabilities

    train_dir: Path = args.train_dir
    run = RunDir(train_dir)
    split, history = run.read_split(), run.read_history()
    if split is None or history is None:
        sys.exit(f"error: {train_dir} holds no finished polypseg train run (no split.json or history.json)")
    config = run.read_settings().config.to_dict()
    pranet = evaluate_pranet(train_dir, args.data, args.test_list, device=args.device)
    external = evaluate_external(run.best_checkpoint(), args.external, out=train_dir, device=args.device)
    # flip TTA too (`--tta`): its use was decided on the inner validation images (scripts/val_choices.py)
    pranet_tta = evaluate_pranet(train_dir, args.data, args.test_list, device=args.device, tta_flip=True)
    external_tta = evaluate_external(
        run.best_checkpoint(), args.external, out=train_dir, device=args.device, tta_flip=True
    )
    best = load_checkpoint(run.best_checkpoint())

    def test_metrics(pranet: dict, external: dict) -> dict:
        single = external["models"][0]["at"][f"{external['threshold']:g}"]
        return {
            "kvasir_test100_original_resolution": {
                "dice": pranet["original_resolution"]["mdice"],
                "iou": pranet["original_resolution"]["miou"],
                "dice_ci95_low": pranet["ci95"]["mdice"][0],
                "dice_ci95_high": pranet["ci95"]["mdice"][1],
            },
            "cvc_clinicdb62": {
                "dice": single["dice"],
                "iou": single["iou"],
                "dice_ci95_low": external["ci95"]["dice"][0],
                "dice_ci95_high": external["ci95"]["dice"][1],
            },
        }

    release = {
        "training_command": args.command,
        "recipe": config["train"]["recipe"],
        "precision": config["train"]["precision"],
        "epochs": config["train"]["epochs"],
        "best_epoch": best.metadata.get("epoch"),
        "selected_on": f"best val_dice on the inner validation split ({len(split['val'])} training images)",
        "threshold": best.threshold,
        "data": {
            "trained_on": f"Kvasir-SEG: {len(split['train'])} images (+ {len(split['val'])} for the best epoch), random-init encoder",
            "held_out": f"the {len(split['test'])} images of {args.test_list.name} (PraNet's test split); CVC-ClinicDB never seen",
            "licence": "Kvasir-SEG: research and education only; cite Jha et al., MMM 2020",
        },
        "test_metrics": test_metrics(pranet, external),
        "test_metrics_flip_tta": test_metrics(pranet_tta, external_tta),
        "history_epochs": len(history),
    }
    if "init" in best.metadata:  # a later stage: what it started from (the earlier stage's SHA-256)
        release["stages"] = args.stages or "fine-tuned from the checkpoint recorded in 'init'"
    shipped = release_model(
        run.best_checkpoint(),
        args.name,
        release,
        weights_dir=args.weights_dir,
        replaces=_shipped_in_git(args.name, args.weights_dir),
        summary=(
            f"{config['model']['arch']} / {config['model']['encoder']}, random init, Kvasir-SEG {len(split['train']) + len(split['val'])}; test Dice {release['test_metrics']['kvasir_test100_original_resolution']['dice']:.3f} "
            f"(Kvasir-SEG test 100), {release['test_metrics']['cvc_clinicdb62']['dice']:.3f} (CVC-ClinicDB-62)"
        ),
    )

    # fp16 storage must not change the answers: Dice of the shipped weights vs the fp32 checkpoint
    stems = load_split_file(args.test_list)
    test = build_cache(args.data, best.config.train.image_size, progress=False).subset(stems)
    scores = {}
    for label, checkpoint in (("fp32", best), ("fp16", load_checkpoint(shipped.stem))):
        probs = predict_probabilities(checkpoint.model, test.images, precision="fp32", batch_size=16)
        scores[label] = evaluate_probabilities(probs, test.masks, thresholds=(0.5,)).at_threshold(0.5)["dice"]
    print(
        f"fp16 storage: Dice {scores['fp16']:.4f} vs fp32 {scores['fp32']:.4f} ({scores['fp16'] - scores['fp32']:+.4f})"
    )
    (train_dir / "fp16_check.json").write_text(json.dumps(scores, indent=2))

    run.copy_record(docs)
    print(f"shipped {shipped.name}: {shipped.weights} ({shipped.size_bytes / 1e6:.1f} MB, sha256 {shipped.sha256})")
    print(f"small files: {docs}")


def _shipped_in_git(name: str, weights_dir: Path | None) -> tuple[str, str] | None:
    """The commit and repository path of the file ``name`` now ships as, or None when none is shipped yet."""
    import subprocess

    from polypseg.models.pretrained import WEIGHTS_DIR

    weights = (weights_dir or WEIGHTS_DIR) / f"{name}.safetensors"
    if not weights.is_file():
        return None
    if not weights.resolve().is_relative_to(REPO):
        sys.exit(f"error: {weights} is outside this repository, so git cannot keep the release it replaces")
    path = str(weights.resolve().relative_to(REPO))
    commit = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%H", "--", path], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not commit:
        sys.exit(f"error: {path} is not committed: commit the release it replaces first, so that it stays restorable")
    return commit, path


if __name__ == "__main__":
    sys.exit(main())
