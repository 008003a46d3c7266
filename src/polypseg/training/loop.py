"""Training one model on one split: GPU-resident data, batched augmentation, resumable.

The preprocessed images live on the training device as ``uint8`` for the whole run and each batch
is augmented there (:mod:`polypseg.data.augment`), so the GPU never waits for a data loader. Runs on
CPU too. Under ``torchrun`` each process trains on its shard of every epoch's permutation with
DistributedDataParallel (NCCL on CUDA, gloo on CPU); only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polypseg.core.clock import Stopwatch
from polypseg.core.config import OPTIMIZERS, SCHEDULES, ConfigError, RunConfig, TrainConfig
from polypseg.core.devices import resolve_device
from polypseg.core.io_utils import atomic_write_json, read_json, remove_stale_temps
from polypseg.core.precision import autocast, resolve_precision, use_channels_last
from polypseg.core.runs import RunDir
from polypseg.data.augment import augment_batch
from polypseg.data.cache import CachedData
from polypseg.data.transforms import normalize
from polypseg.models.checkpoint import (
    CheckpointError,
    TrainingStateError,
    checkpoint_paths,
    file_sha256,
    load_checkpoint,
    load_training_state,
    model_state,
    read_metadata,
    remove_training_state,
    save_checkpoint_tensors,
    save_training_state,
    training_state_exists,
)
from polypseg.models.factory import create_model
from polypseg.training.distributed import DistributedContext, resolve_training_device
from polypseg.training.evaluation import evaluate_probabilities, predict_probabilities
from polypseg.training.losses import create_loss
from polypseg.training.norm import freeze_encoder_weights, set_training_mode
from polypseg.training.progress import TrainingProgress
from polypseg.training.state import BestCheckpoint, TrainingState

# Saving optimizer state for --resume costs ~0.3 s on a GPU run of 1-s epochs: do it at most
# this often (and always at the end), so an interrupted run loses at most this much work.
STATE_EVERY_S = 60.0


def load_initial_weights(model: nn.Module, config: RunConfig) -> dict[str, str] | None:
    """Start ``model`` from the trained model ``config.train.init_from`` names (fine-tuning).

    Returns the provenance recorded in the run's ``best.json`` (``from`` as given, the source's
    weights file's SHA-256), or ``None`` when ``init_from`` is ``none``. A source that is not one model
    of the same architecture is a :class:`~polypseg.core.config.ConfigError` naming it.
    """
    from polypseg.training.init_source import init_checkpoint

    checkpoint = init_checkpoint(config)  # the one --init rule: one checkpoint, same architecture
    if checkpoint is None:
        return None
    spec, label = config.train.init_from, f"--init {config.train.init_from}"
    try:
        source = load_checkpoint(checkpoint)
    except CheckpointError as error:
        raise ConfigError(f"{label}: {error}") from None
    model.load_state_dict(source.model.state_dict(), strict=True)
    return {"from": spec, "weights": checkpoint.name, "weights_sha256": file_sha256(checkpoint)}


def resolve_run_precision(config: RunConfig, device: str | torch.device) -> RunConfig:
    """Fix ``config.train.precision`` (``auto`` -> ``bf16``/``fp32`` on this device) so the run's config saves the choice."""
    config.train.precision = resolve_precision(config.train.precision, resolve_device(device))
    return config


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(config: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at ``step`` (stateless, so resuming needs only the step count)."""
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "cosine":
        return cosine
    if config.schedule == "onecycle":
        # one-cycle's annealing phase: cosine from the peak down to 1/1000 of it
        return 1e-3 + (1 - 1e-3) * cosine
    raise ConfigError(f"unknown schedule '{config.schedule}'; choose one of: {', '.join(SCHEDULES)}")


def create_optimizer(model: nn.Module, config: TrainConfig, precision: str = "fp32") -> torch.optim.Optimizer:
    """The recipe's optimizer. Adam/AdamW use the fused single-kernel update on CUDA, and on the CPU
    when ``precision`` (the resolved one) is ``bf16``."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused=None lets torch pick its default (foreach). On CUDA the fused kernel launches far fewer
    # kernels per step, which counts for a 24M-parameter model at small batch sizes. On the CPU it
    # takes 48 instead of 84 ms a step for U-Net/ResNet-34 on 2 cores, but its rounding differs from
    # foreach's in the last bit, and --precision fp32 promises today's numbers bit for bit: so only bf16.
    fused = True if params and (params[0].is_cuda or precision == "bf16") else None
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    raise ConfigError(f"unknown optimizer '{config.optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")


class TrainStep:
    """The model, optimizer, loss and weight EMA of a run, and one optimisation step on a batch.

    A step takes ``uint8`` images ``(B, 3, S, S)`` and masks ``(B, 1, S, S)`` already on the device:
    augment, normalise, forward (bf16 autocast and channels-last per :mod:`polypseg.core.precision`), loss, backward,
    optimizer step, EMA update. Nothing in it reads a tensor back to the host, so on a GPU the host
    queues the next step while this one runs. :func:`train_model` and the training-speed benchmark
    (:func:`polypseg.experiments.bench_train.benchmark_training`) both run this, so the benchmark times the real step.
    """

    def __init__(self, config: RunConfig, device: torch.device, channels_last: bool | None = None) -> None:
        tc = config.train
        self.config, self.device = config, device
        self.precision = resolve_precision(tc.precision, device)
        # channels_last=None follows polypseg.core.precision; True/False forces it (bench-train's variants)
        self.channels_last = (
            use_channels_last(device, self.precision, tc.channels_last) if channels_last is None else channels_last
        )
        self.model = create_model(config.model)
        self.init = load_initial_weights(self.model, config)
        if tc.freeze_encoder:
            freeze_encoder_weights(self.model)
        self.model = self.model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema: nn.Module | None = None
        if tc.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
        self.optimizer = create_optimizer(self.model, tc, self.precision)
        self.loss_fn = create_loss(tc.loss)
        self.forward_model: nn.Module = self.model

    def wrap(self, context: DistributedContext) -> None:
        """DistributedDataParallel under torchrun, then ``torch.compile`` if the recipe asks (CUDA only)."""
        if context.enabled:
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.config.train.compile and self.device.type == "cuda":
            self.forward_model = torch.compile(self.forward_model)

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and keep: the EMA's when the recipe averages them."""
        return self.ema.module if self.ema is not None else self.model  # type: ignore[return-value]

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor, lr: float, generator: torch.Generator, size: int | None = None
    ) -> torch.Tensor:
        """One step at learning rate ``lr``, at ``size`` px if given; returns the loss (detached, on the device)."""
        tc = self.config.train
        mark = self._mark
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mark(None)
        x, y = images.float().div_(255), masks.float()
        if size is not None and size != x.shape[-1]:
            x, y = downsample_batch(x, y, size)
        x, y = augment_batch(x, y, tc.augment, generator)
        x = normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        mark("augment")
        with autocast(self.device, self.precision):
            logits = self.forward_model(x)
        loss = self.loss_fn(logits.float(), y)
        mark("forward")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        self.optimizer.step()
        mark("optimizer")
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        mark("ema")
        return loss.detach()

    # Where a step's time goes (bench-train --breakdown): off (a no-op) unless phase_times is set.
    phase_times: dict[str, list[float]] | None = None
    _last_mark: float = 0.0

    def _mark(self, phase: str | None) -> None:
        if self.phase_times is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # only when measuring: it serialises host and GPU
        now = time.perf_counter()
        if phase is not None:
            self.phase_times.setdefault(phase, []).append(now - self._last_mark)
        self._last_mark = now


def downsample_batch(images: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-downsample a float batch to ``size`` px; the mask's area fraction is re-binarised at 0.5."""
    images = F.interpolate(images, size=(size, size), mode="area")
    masks = (F.interpolate(masks, size=(size, size), mode="area") >= 0.5).to(masks.dtype)
    return images, masks


def epoch_size(config: TrainConfig, epoch: int) -> int | None:
    """The training resolution of ``epoch`` (0-based) under progressive resizing; None = image_size."""
    if config.progressive_size and epoch < config.progressive_epochs:
        return config.progressive_size
    return None


@dataclass
class TrainResult:
    best_checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = float("nan")


@dataclass(frozen=True)
class _Batches:
    """An epoch cut into steps: each takes ``per_rank`` images on each of ``world_size`` processes."""

    n_train: int
    per_rank: int
    world_size: int
    rank: int

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_train // (self.per_rank * self.world_size))

    def indices(self, order: torch.Tensor, step: int) -> torch.Tensor:
        chunk = self.per_rank * self.world_size
        return order[step * chunk : (step + 1) * chunk][self.rank :: self.world_size]


def train_model(
    config: RunConfig,
    train: CachedData,
    val: CachedData | None,
    out_dir: Path | str,
    *,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    description: str = "training",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    keep_state: bool | None = None,
) -> TrainResult:
    """Train ``config`` on ``train``; keep the best epoch on ``val`` (or the last if ``val`` is None).

    Writes ``out_dir/best.{safetensors,json}``, ``out_dir/history.json`` and, for ``resume``,
    ``out_dir/last_state.{safetensors,json}`` (names owned by :class:`polypseg.core.runs.RunDir`). With
    ``resume=True`` training continues from the last saved state; a finished run (history complete) is
    returned as is.

    The training state is kept only while the run is unfinished (it holds the optimizer's moments,
    about three times the model): ``keep_state=True``, or ``POLYPSEG_KEEP_TRAINING_STATE=1`` in the
    environment, keeps it after the last epoch as well. Resuming removes temporary files left by
    interrupted writes, verifies the state (see :func:`polypseg.models.checkpoint.load_training_state`)
    and rewrites ``best.*`` and ``history.json`` to match it, saying so in one-line notes on stderr
    (``progress=False`` silences the progress bars, not these notes).
    """
    run = RunDir(out_dir)
    keep_state = _keep_state_asked() if keep_state is None else keep_state
    tc = config.train
    context, step_fn = _start_process(config, device)
    batches = _Batches(len(train.stems), max(1, tc.batch_size // context.world_size), context.world_size, context.rank)
    steps_per_epoch = batches.steps_per_epoch
    say = _notes(context.is_main)  # rare one-line notes print even without progress bars
    if resume and context.is_main:
        for stale in remove_stale_temps(run.path):
            say(f"removed {stale.name}, a temporary file left by an interrupted write")
    if resume and training_finished(run.path, tc.epochs):
        return _finished_result(run, keep_state, context)
    state = _start_state(run, config, step_fn, resume=resume, steps_per_epoch=steps_per_epoch, context=context, say=say)

    step_fn.wrap(context)
    images, masks = _on_device(train, step_fn.device)
    writer = _EpochWriter(run, step_fn, steps_per_epoch, keep_state)
    with TrainingProgress(progress and context.is_main, description, steps_per_epoch * tc.epochs) as bar:
        bar.advance(state.epoch * steps_per_epoch)
        for epoch in range(state.epoch, tc.epochs):
            record = _run_epoch(step_fn, images, masks, val, epoch, batches, bar, validate=context.is_main)
            state.history.append(record)
            state.epoch = epoch + 1
            if context.is_main:
                score = record.get("val_dice", float(epoch))  # without validation, the latest is best
                writer.write(state, record, score, validated=val is not None)
            bar.epoch_done(record, tc.epochs, state.history)
            if on_epoch is not None:
                on_epoch(record)
    context.barrier()
    if context.is_main and not keep_state and len(state.history) >= tc.epochs:
        remove_training_state(run.training_state())  # finished: the optimizer state (3x the model) is not kept
    return TrainResult(
        best_checkpoint=run.best_checkpoint().with_suffix(".safetensors"),
        history=state.history,
        best_epoch=state.best.epoch,
        best_score=state.best.score,
    )


def _start_process(config: RunConfig, device: str) -> tuple[DistributedContext, TrainStep]:
    """This process's place in a torchrun job, its device, and its seeded model, optimizer and loss."""
    context = DistributedContext.from_env()
    torch_device = resolve_training_device(device, context)
    context.setup(torch_device)
    seed_everything(config.train.seed)
    return context, TrainStep(config, torch_device)


def _on_device(data: CachedData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A cached set as ``uint8`` tensors on ``device``: images ``(N, 3, S, S)``, masks ``(N, 1, S, S)``."""
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous().to(device)
    masks = torch.from_numpy(data.masks).unsqueeze(1).to(device, dtype=torch.uint8)
    return images, masks


def _keep_state_asked() -> bool:
    return os.environ.get("POLYPSEG_KEEP_TRAINING_STATE", "") not in ("", "0", "false", "no")


def _start_state(
    run: RunDir,
    config: RunConfig,
    step_fn: TrainStep,
    *,
    resume: bool,
    steps_per_epoch: int,
    context: DistributedContext,
    say: Callable[[str], None],
) -> TrainingState:
    """The saved training state when resuming one (model, optimizer and EMA loaded into ``step_fn``), else epoch 0."""
    best_stem = run.best_checkpoint()
    if resume and training_state_exists(run.training_state()):
        _check_same_init(best_stem, step_fn.init)
        saved = load_training_state(
            run.training_state(), step_fn.model, step_fn.optimizer, step_fn.ema, steps_per_epoch=steps_per_epoch
        )
        epoch = saved["epoch"]
        state = TrainingState(
            epoch, saved["history"][:epoch], BestCheckpoint.from_state(best_stem, saved, step_fn.eval_model)
        )
        if context.is_main:
            _restore_consistent_files(run, config, saved, step_fn.eval_model, state.history, say)
        return state
    if run.history_path().is_file() and context.is_main:
        if not resume:
            raise FileExistsError(f"{run.path} already holds a training run; pass --resume to continue it")
        say(
            f"{run.path} has no saved training state (it is saved every {STATE_EVERY_S:g} s): training starts again from epoch 1"
        )
    return TrainingState(0, [], BestCheckpoint(best_stem))


def _check_same_init(best_stem: Path, init: dict[str, str] | None) -> None:
    """A resumed run must go on from the ``--init`` weights it started from: a name (a shipped model,
    say, after an upgrade) or path whose file has changed since is refused by its SHA-256."""
    if init is None or not checkpoint_paths(best_stem)[0].is_file():
        return
    started = read_metadata(best_stem).get("init") or {}
    if started.get("weights_sha256") not in (None, init["weights_sha256"]):
        raise ConfigError(
            f"--init {init['from']}: its weights changed since this run started (SHA-256 "
            f"{started['weights_sha256'][:12]}..., now {init['weights_sha256'][:12]}...); resume with the file "
            "it started from, or start a new --out"
        )


def _train_epoch(
    step_fn: TrainStep,
    images: torch.Tensor,
    masks: torch.Tensor,
    epoch: int,
    tc: TrainConfig,
    batches: _Batches,
    bar: TrainingProgress,
) -> dict[str, Any]:
    """One epoch's optimisation steps; returns its record (epoch, mean training loss, last learning rate)."""
    device = images.device
    steps = batches.steps_per_epoch
    set_training_mode(step_fn.model, freeze_norm=tc.freeze_norm, freeze_encoder=tc.freeze_encoder)
    # Seeded per epoch (not from a running RNG) so a resumed run repeats the same batches.
    cpu_gen = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
    order = torch.randperm(batches.n_train, generator=cpu_gen).to(device)  # one copy per epoch, not per step
    aug_gen = torch.Generator(device=device).manual_seed(tc.seed * 100_003 + epoch * 7919 + batches.rank)
    loss_sum = torch.zeros((), device=device)
    for step in range(steps):
        lr = tc.lr * lr_factor(tc, epoch * steps + step, steps * tc.epochs, steps)
        index = batches.indices(order, step)
        loss_sum += step_fn(images[index], masks[index], lr, aug_gen, size=epoch_size(tc, epoch))
        bar.advance()
    return {"epoch": epoch + 1, "train_loss": float(loss_sum) / steps, "lr": step_fn.optimizer.param_groups[0]["lr"]}


def _run_epoch(
    step_fn: TrainStep,
    images: torch.Tensor,
    masks: torch.Tensor,
    val: CachedData | None,
    epoch: int,
    batches: _Batches,
    bar: TrainingProgress,
    *,
    validate: bool,
) -> dict[str, Any]:
    """One epoch trained, then validated on ``val`` when given and ``validate``; its record, timed."""
    tc = step_fn.config.train
    watch = Stopwatch()  # pauses (kill -STOP) are left out of the epoch's seconds
    record = _train_epoch(step_fn, images, masks, epoch, tc, batches, bar)
    if val is not None and validate:
        record.update(_validate(step_fn.eval_model, val, step_fn.loss_fn, step_fn.device, tc))
    record.update(watch.record())
    return record


@dataclass
class _EpochWriter:
    """What the main process writes after each epoch: ``best.*`` when the epoch scores best,
    ``history.json``, and the training state (at most every :data:`STATE_EVERY_S` seconds, and after
    the last epoch only when it is kept)."""

    run: RunDir
    step_fn: TrainStep
    steps_per_epoch: int
    keep_state: bool
    state_saved_at: float = field(default_factory=time.monotonic)

    def write(self, state: TrainingState, record: dict[str, Any], score: float, *, validated: bool) -> None:
        step_fn = self.step_fn
        state.best.offer(score, record, step_fn.eval_model, step_fn.config, validated=validated, init=step_fn.init)
        atomic_write_json(self.run.history_path(), state.history)
        is_last = state.epoch == step_fn.config.train.epochs
        if (not is_last or self.keep_state) and (is_last or time.monotonic() - self.state_saved_at > STATE_EVERY_S):
            self._save_state(state)
            self.state_saved_at = time.monotonic()

    def _save_state(self, state: TrainingState) -> None:
        """The state is one file: epoch, history, optimizer, EMA and, when the best epoch is an earlier
        one, its weights too, so resuming can put best.* back in step with it."""
        save_training_state(
            self.run.training_state(),
            self.step_fn.model,
            self.step_fn.optimizer,
            state.to_state(self.steps_per_epoch),
            ema_model=self.step_fn.ema,
            best_state=state.best.tensors_for_state(state.epoch),
        )


def tidy_run_folder(out_dir: Path | str, epochs: int, keep_state: bool = False) -> None:
    """On resume: remove temporary files of interrupted writes and, once training has finished,
    the training state (runs finished by older versions kept it)."""
    run = RunDir(out_dir)
    remove_stale_temps(run.path)
    if not keep_state and not _keep_state_asked():
        if training_finished(run.path, epochs):
            remove_training_state(run.training_state())


def _notes(enabled: bool) -> Callable[[str], None]:
    """One-line notes on stderr for the main process (what resuming did, and why)."""
    import sys

    def say(message: str) -> None:
        if enabled:
            print(f"note: {message}", file=sys.stderr, flush=True)

    return say


def _finished_result(run: RunDir, keep_state: bool, context: DistributedContext) -> TrainResult:
    """A run whose history is complete: returned as is; a left-over training state is removed."""
    history = read_json(run.history_path())
    best_epoch, best_score = 0, float("nan")
    try:
        meta = read_metadata(run.best_checkpoint())
        best_epoch = int(meta.get("epoch", 0))
        best_score = float(meta.get("metrics", {}).get("val_dice", float("nan")))
    except (CheckpointError, TypeError, ValueError):
        pass
    if context.is_main and not keep_state:
        remove_training_state(run.training_state())
    return TrainResult(
        best_checkpoint=run.best_checkpoint().with_suffix(".safetensors"),
        history=history,
        best_epoch=best_epoch,
        best_score=best_score,
    )


def _restore_consistent_files(
    run: RunDir,
    config: RunConfig,
    saved: dict[str, Any],
    eval_model: nn.Module,
    history: list[dict[str, Any]],
    say: Callable[[str], None],
) -> None:
    """Put ``best.*`` and ``history.json`` back in step with the training state being resumed.

    Epochs after the state were trained by the interrupted process and will be trained again; any
    best checkpoint or history they wrote is replaced by the state's, so the resumed run continues
    exactly from the state, never from a mix.
    """
    out_dir, best_stem = run.path, run.best_checkpoint()
    epoch = int(saved["epoch"])
    say(f"resuming {out_dir} after epoch {epoch} (training state: {saved.get('state_format', 'one file')})")
    written = read_json(run.history_path()) if run.history_path().is_file() else []
    if len(written) > epoch:
        say(f"epochs {epoch + 1}-{len(written)} ran after the last saved state and will be trained again")
    atomic_write_json(run.history_path(), history)
    record = saved.get("best") or {}
    best_epoch = int(saved.get("best_epoch", 0))
    if not record or not best_epoch:  # an older state: it does not say which best.* belongs to it
        try:
            on_disk = int(read_metadata(best_stem).get("epoch", 0))
        except CheckpointError:
            on_disk = 0
        if on_disk > epoch:
            say(
                f"best.* is from epoch {on_disk}, after the saved state (epoch {epoch}); this older state cannot restore "
                "its own best epoch, so best.* is replaced only when a resumed epoch scores higher"
            )
        return
    try:
        current = read_metadata(best_stem).get("tensors_sha256")
    except CheckpointError:
        current = None
    if current == record.get("tensors_sha256"):
        return
    tensors = saved.get("best_state")
    if tensors is None and best_epoch == epoch:
        tensors = model_state(eval_model)
    if tensors is None:
        raise TrainingStateError(
            f"the training state in {out_dir} lacks the weights of its best epoch ({best_epoch}); delete {run.training_state()}.* to start over"
        )
    save_checkpoint_tensors(best_stem, dict(tensors), config, record.get("metrics"), extra=record.get("extra"))
    say(f"best.* restored to epoch {best_epoch}, the best epoch of the saved state")


def predict_with_recipe(
    model: nn.Module, images: np.ndarray, config: TrainConfig, device: torch.device
) -> torch.Tensor:
    """Held-out probabilities the way the recipe evaluates: its eval batch size, flip TTA and precision."""
    return predict_probabilities(
        model,
        images,
        device=device,
        batch_size=config.eval_batch_size,
        tta_flip=config.tta_flip,
        precision=config.precision,
    )


def _validate(
    model: nn.Module, val: CachedData, loss_fn: Callable, device: torch.device, tc: TrainConfig
) -> dict[str, float]:
    probs = predict_probabilities(
        model, val.images, device=device, batch_size=tc.eval_batch_size, precision=tc.precision
    )
    masks = torch.from_numpy(val.masks)
    metric = evaluate_probabilities(probs, masks, thresholds=(0.5,))
    # Dice loss on probabilities recovered as logits: same quantity the training loss measures
    logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6)).unsqueeze(1)
    return {
        "val_loss": float(loss_fn(logits, masks.unsqueeze(1).float())),
        "val_dice": metric.at_threshold(0.5)["dice"],
    }


def training_finished(out_dir: Path | str, epochs: int) -> bool:
    """True when ``out_dir`` holds a best checkpoint and a history of ``epochs`` epochs."""
    run = RunDir(out_dir)
    history = run.history_path()
    weights = run.best_checkpoint().with_suffix(".safetensors")
    return weights.is_file() and history.is_file() and len(read_json(history)) >= epochs
