"""Sizing the ``adapt`` recipe to a small set of corrected images and to the model it starts from.

A fixed number of epochs means very different training for 30 and for 300 images. The ``adapt``
recipe instead aims at about :data:`TARGET_STEPS` optimizer steps whatever the set's size, warms
up over :data:`WARMUP_STEPS` steps, and lowers the learning rate for the smallest sets, which a
full-strength update would over-fit in a few steps. It trains at the input size of the model it
starts from (:func:`match_init_size`): a model trained at 352 px sees polyps at that scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from polypseg.core.config import RunConfig
from polypseg.data.pairing import index_dataset
from polypseg.data.splits import inner_validation_split, load_split_file, require_training_part

TARGET_STEPS = 240
WARMUP_STEPS = 20
MIN_EPOCHS, MAX_EPOCHS = 8, 300
FULL_LR_IMAGES = 100  # sets of this many images or more train at the recipe's full learning rate
MIN_LR_SHARE = 0.5


@dataclass(frozen=True)
class AdaptPlan:
    """What :func:`scale_to_set_size` chose, for the command to print."""

    images: int
    epochs: int
    steps: int
    warmup_epochs: float
    lr: float

    def describe(self) -> str:
        return (
            f"adapt: {self.images} training images -> {self.epochs} epochs ({self.steps} optimizer steps, "
            f"warm-up {self.warmup_epochs:.2f} epochs), lr {self.lr:.2g}"
        )


def plan_for(config: RunConfig, n_train: int) -> AdaptPlan:
    """Epochs, warm-up and learning rate of the ``adapt`` recipe for ``n_train`` training images."""
    if n_train < 1:
        raise ValueError("the training set is empty")
    steps_per_epoch = max(1, n_train // config.train.batch_size)  # the training loop drops the last partial batch
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))
    warmup = min(WARMUP_STEPS / steps_per_epoch, epochs / 4)
    share = min(1.0, max(MIN_LR_SHARE, math.sqrt(n_train / FULL_LR_IMAGES)))
    return AdaptPlan(n_train, epochs, epochs * steps_per_epoch, round(warmup, 4), config.train.lr * share)


def scale_to_set_size(
    config: RunConfig, n_train: int, *, keep_epochs: bool = False, keep_lr: bool = False
) -> AdaptPlan:
    """Set ``config.train`` epochs, warm-up and learning rate for ``n_train`` images (in place);
    ``keep_epochs`` / ``keep_lr`` leave what the user chose explicitly."""
    plan = plan_for(config, n_train)
    if not keep_epochs:
        config.train.epochs = plan.epochs
        config.train.warmup_epochs = plan.warmup_epochs
    if not keep_lr:
        config.train.lr = plan.lr
    return AdaptPlan(
        n_train,
        config.train.epochs,
        config.train.epochs * max(1, n_train // config.train.batch_size),
        config.train.warmup_epochs,
        config.train.lr,
    )


def training_set_size(data: Path | str, config: RunConfig, test_list: Path | str | None = None) -> int:
    """How many images ``polypseg train`` trains on: the data set's pairs minus ``test_list`` and
    the inner validation share, split as :func:`polypseg.training.train_split.train_single_split` does,
    plus the ``config.train.replay_images`` replayed pairs that join them."""
    stems = [sample.stem for sample in index_dataset(data).samples]
    held_out = set(load_split_file(test_list)) if test_list is not None else set()
    train, val = inner_validation_split(
        [s for s in stems if s not in held_out], config.train.val_fraction, config.train.seed
    )
    n_test = len(held_out & set(stems))
    require_training_part(train, data=data, n_test=n_test, n_val=len(val), test_list=test_list)
    return len(train) + config.train.replay_images


def match_init_size(config: RunConfig) -> int | None:
    """Set ``config.train.image_size`` to the input size of the model ``config.train.init_from`` names
    (in place); returns it, or ``None`` (nothing changed) when the run starts from no model."""
    from polypseg.training.init_source import init_image_size

    size = init_image_size(config)
    if size is not None:
        config.train.image_size = size
    return size
