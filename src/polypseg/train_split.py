"""One train/validation/test split (``polypseg train``), e.g. the PraNet protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from polypseg.checkpoint import load_checkpoint
from polypseg.config import RunConfig, config_differences
from polypseg.cv import refuse_changed_settings
from polypseg.data import DataError, build_cache, load_split_file
from polypseg.devices import resolve_device
from polypseg.evaluation import evaluate_probabilities, predict_probabilities
from polypseg.io_utils import atomic_write_json
from polypseg.training import DistributedContext, resolve_run_precision, train_model


def train_single_split(
    data: Path | str,
    out: Path | str,
    config: RunConfig,
    test_list: Path | str | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    cache_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Train on ``data`` minus the stems in ``test_list``; evaluate once on those stems if given.

    With ``resume=True``, ``config`` must match the one ``out`` was started with.

    The best epoch is chosen on an inner validation split (``config.train.val_fraction`` of the
    training stems, seeded), never on the test stems.
    """
    out = Path(out)
    resolve_run_precision(config, device)
    if resume and (out / "config.json").is_file():
        refuse_changed_settings(out, config_differences(RunConfig.load(out / "config.json"), config))
    cache = build_cache(data, config.train.image_size, cache_dir=cache_dir, progress=progress)
    test_stems: list[str] = []
    if test_list is not None:
        test_stems = load_split_file(test_list)
        missing = sorted(set(test_stems) - set(cache.stems))
        if missing:
            raise DataError(f"{test_list}: {len(missing)} stem(s) not in {data}, e.g. '{missing[0]}'")
    held_out = set(test_stems)
    pool = [s for s in cache.stems if s not in held_out]
    rng = np.random.default_rng(config.train.seed)
    n_val = int(round(config.train.val_fraction * len(pool)))
    val = sorted(pool[i] for i in rng.choice(len(pool), size=n_val, replace=False)) if n_val else []
    train = [s for s in pool if s not in set(val)]
    context = DistributedContext.from_env()
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.json")
        atomic_write_json(out / "split.json", {"data": str(Path(data).resolve()), "train": train, "val": val, "test": test_stems})
    result = train_model(
        config, cache.subset(train), cache.subset(val) if val else None, out, device=device, resume=resume, progress=progress
    )
    summary: dict[str, Any] = {"checkpoint": str(result.best_checkpoint), "best_epoch": result.best_epoch}
    if test_stems and context.is_main:
        torch_device = resolve_device(device)
        checkpoint = load_checkpoint(result.best_checkpoint, device=torch_device)
        test = cache.subset(test_stems)
        probs = predict_probabilities(
            checkpoint.model, test.images, device=torch_device, tta_flip=config.train.tta_flip, precision=config.train.precision
        )
        metric = evaluate_probabilities(probs, test.masks, test.stems)
        summary["test"] = {"n_images": len(test_stems), **metric.compute(), "per_image_dice_at_0.5": dict(zip(test.stems, metric.per_image(0.5)["dice"].round(6).tolist()))}
        atomic_write_json(out / "test_metrics.json", summary["test"])
    return summary

