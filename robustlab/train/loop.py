"""The one training loop: a `tf.function` step over batches from a Mixture, for every regime."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from robustlab.config import TrainConfig, lr_factor
from robustlab.evaluation.validation import Validator
from robustlab.train.checkpoint import LoopState, save_checkpoint
from robustlab.train.methods import TrainingMethod
from robustlab.train.mixture import Mixture

EpochHook = Callable[[dict[str, float], int], None]  # (metrics, global epoch)
CheckpointHook = Callable[[Path], None]
# seconds between plain progress lines when stderr is not a terminal ($ROBUSTLAB_PROGRESS_EVERY_S)
PROGRESS_EVERY_S = float(os.environ.get("ROBUSTLAB_PROGRESS_EVERY_S", "60"))


@dataclass(frozen=True)
class Monitor:
    """Early-stopping criterion: a validation metric and whether larger is better."""

    metric: str = "val/loss"
    mode: str = "min"

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best if self.mode == "min" else value > best


@dataclass
class FitResult:
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    phase_epochs: int = 0  # epochs of the phase finished so far, before a resume included


def make_train_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, method: TrainingMethod | None
):
    """Compile one step: the training method attacks rows [0, n_adv) against the current model
    (outside the tape), then one optimizer update on the method's loss (`robustlab.train.methods`).

    The step runs in the model's own precision (a mixed_bfloat16 model computes its layers in
    bfloat16, the attack included); logits are cast to float32, so loss and accuracy are float32.
    Without a method, every row trains clean (mean cross-entropy).
    """
    method = method or TrainingMethod.clean()

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 28, 28, 1], tf.float32),
            tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([], tf.int32),
        ]
    )
    def step(x, y, n_adv):
        x = method.inputs(model, x, y, n_adv)
        with tf.GradientTape() as tape:
            logits = tf.cast(model(x, training=True), tf.float32)
            loss, logits = method.loss(y, logits, n_adv)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), y), tf.float32))
        return loss, correct

    return step


def fit(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    mixture: Mixture,
    cfg: TrainConfig,
    epochs: int,
    *,
    validators: list[Validator],
    method: TrainingMethod | None = None,
    monitor: Monitor = Monitor(),
    state: LoopState | None = None,
    best_weights: list[np.ndarray] | None = None,
    checkpoint_dir: Path | None = None,
    on_epoch: EpochHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
    phase: str = "train",
    eps_warmup: float = 0.0,
) -> FitResult:
    """Train `epochs` epochs (resuming from `state`), early-stop on `monitor`, keep the best weights.

    After each epoch: validators run on the model being trained, in its training precision
    (val/* curves and early stopping of a mixed_bfloat16 run are bf16 figures), `on_epoch` gets
    the metrics, a checkpoint is written to `checkpoint_dir` and handed to `on_checkpoint`. On
    return the model holds the best weights. With `eps_warmup` > 0 epochs, the attack's
    `eps_scale` ramps linearly from 0 to 1 per batch.

    Reproducible given `cfg.seed`: the batch order comes from a NumPy RNG whose state is saved in
    each checkpoint, and the attack's random starts are keyed by (seed, global epoch, batch), so a
    run resumed from the checkpoint of epoch k replays epoch k + 1 exactly as the uninterrupted
    run does (the model's initial weights are seeded by `robustlab.seeding.seed_everything`).
    """
    state = state or LoopState()
    rng = np.random.default_rng(cfg.seed)
    if state.rng_state:
        rng.bit_generator.state = state.rng_state
    step = make_train_step(model, optimizer, method if mixture.n_adv else None)
    perturb = method.perturb if (method is not None and mixture.n_adv) else None
    result = FitResult(epochs_run=0, best_epoch=state.best_epoch, stopped_early=False)
    t0 = time.perf_counter()
    for epoch in range(state.epoch + 1, epochs):
        if cfg.patience and state.wait >= cfg.patience:  # resumed from an early-stopped phase
            break
        t_epoch = time.perf_counter()
        if cfg.lr_schedule != "constant":
            optimizer.learning_rate = cfg.learning_rate * lr_factor(cfg.lr_schedule, epoch, epochs)
        if perturb is not None and hasattr(perturb, "seed"):  # random starts keyed by position
            perturb.seed.assign([cfg.seed, (state.global_epoch + 1) << 32])
        where = f"{phase}] epoch {epoch + 1}/{epochs}"
        metrics = _train_epoch(step, mixture, rng, perturb, eps_warmup, epoch, where)
        metrics["train/learning_rate"] = float(np.asarray(optimizer.learning_rate))
        for validate in validators:
            metrics.update(validate(model))
        metrics["time/epoch_seconds"] = time.perf_counter() - t_epoch
        best_weights = _end_epoch(state, result, cfg, monitor, model, best_weights, metrics, epoch)
        if epoch == epochs - 1:
            state.done = True
        state.rng_state = rng.bit_generator.state
        print(
            f"[{where}  "
            + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "time/epoch_seconds")
            + f"  ({metrics['time/epoch_seconds']:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
        if on_epoch:
            on_epoch(metrics, state.global_epoch)
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, model, optimizer, best_weights, state)
            if on_checkpoint:
                on_checkpoint(checkpoint_dir)
        if result.stopped_early:
            print(
                f"[{phase}] early stop: {monitor.metric} did not improve for {cfg.patience} epochs",
                file=sys.stderr,
            )
    if best_weights is not None:
        model.set_weights(best_weights)
    result.best_epoch = state.best_epoch
    result.phase_epochs = state.epoch + 1
    result.seconds = time.perf_counter() - t0
    return result


def _train_epoch(
    step,
    mixture: Mixture,
    rng: np.random.Generator,
    perturb,
    eps_warmup: float,
    epoch: int,
    where: str,
) -> dict[str, float]:
    """One pass over the mixture's batches; the epoch's mean training loss and accuracy. With
    `eps_warmup` > 0 epochs, the attack's `eps_scale` ramps linearly from 0 to 1 per batch."""
    warm_steps = eps_warmup * mixture.steps_per_epoch if perturb is not None else 0.0
    tty = sys.stderr.isatty()
    loss_sum = correct_sum = seen = 0.0
    bar = tqdm(
        mixture.epoch(rng),
        total=mixture.steps_per_epoch,
        desc=where.replace("] ", " "),
        file=sys.stderr,
        leave=False,
        mininterval=2.0,
        disable=not tty,
    )
    last_line = time.perf_counter()
    for b, batch in enumerate(bar):
        if warm_steps:
            scale = min(1.0, (epoch * mixture.steps_per_epoch + b + 1) / warm_steps)
            perturb.eps_scale.assign(scale)
        loss, correct = step(
            tf.constant(batch.x), tf.constant(batch.y), tf.constant(batch.n_adv, tf.int32)
        )
        n = len(batch.y)
        loss_sum += float(loss) * n
        correct_sum += float(correct)
        seen += n
        bar.set_postfix(
            loss=f"{loss_sum / seen:.4f}", acc=f"{correct_sum / seen:.4f}", refresh=False
        )
        if not tty and time.perf_counter() - last_line > PROGRESS_EVERY_S:  # logs: one a minute
            last_line = time.perf_counter()
            print(
                f"[{where}  batch {b + 1}/{mixture.steps_per_epoch}  "
                f"loss={loss_sum / seen:.4f} acc={correct_sum / seen:.4f}",
                file=sys.stderr,
                flush=True,
            )
    bar.close()
    return {"train/loss": loss_sum / max(seen, 1), "train/acc": correct_sum / max(seen, 1)}


def _end_epoch(
    state: LoopState,
    result: FitResult,
    cfg: TrainConfig,
    monitor: Monitor,
    model: keras.Model,
    best_weights: list[np.ndarray] | None,
    metrics: dict[str, float],
    epoch: int,
) -> list[np.ndarray] | None:
    """Advance the loop state after an epoch: best epoch and weights, early-stopping patience."""
    state.epoch, state.global_epoch = epoch, state.global_epoch + 1
    value = metrics.get(monitor.metric)
    if value is None:  # nothing to monitor (no validators): keep the last weights
        state.best_epoch = epoch
    elif monitor.better(value, state.best_value):
        state.best_value, state.best_epoch, state.wait = value, epoch, 0
        best_weights = [np.array(w) for w in model.get_weights()]
    else:
        state.wait += 1
    if cfg.patience and state.wait >= cfg.patience:
        state.done, result.stopped_early = True, True
    result.history.append(metrics)
    result.epochs_run += 1
    return best_weights
