"""Training-time L-inf attacks as pure TensorFlow graphs (no numpy round-trips).

`make_perturb_fn` returns a function meant to be called *inside* a `@tf.function` train step;
`pgd_attack` is a numpy convenience around the same graph for validation and benchmarks.

The computation is the one ART's `ProjectedGradientDescent` performs on a
`TensorFlowV2Classifier` wrapping the same logits (optional uniform start in the eps-ball
clipped to [0, 1], `steps` signed-gradient ascent steps of cross-entropy from logits, projection
to the eps-ball and to [0, 1] after every step, final iterate returned);
`tests/test_attacks.py::test_pgd40_matches_art` checks that both give the same robust accuracy.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from robustlab.attacks.checks import check_logits
from robustlab.config import AttackConfig
from robustlab.errors import ConfigError

PerturbFn = Callable[[keras.Model, tf.Tensor, tf.Tensor], tf.Tensor]


def _per_example_loss(model: keras.Model, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    logits = model(x, training=False)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)


def _input_gradient(model: keras.Model, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """d(sum of per-example cross-entropies)/dx: each row is that example's own gradient."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(_per_example_loss(model, x, y))
    return tape.gradient(loss, x)


def _project(x_adv: tf.Tensor, x: tf.Tensor, eps: float | tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(tf.clip_by_value(x_adv, x - eps, x + eps), 0.0, 1.0)


def _pgd_from(
    model: keras.Model,
    x: tf.Tensor,
    y: tf.Tensor,
    delta0: tf.Tensor,
    *,
    eps: float | tf.Tensor,
    steps: int,
    step_size: float | tf.Tensor,
) -> tf.Tensor:
    """`steps` projected signed-gradient steps starting at clip(x + delta0) (graph loop, not unrolled)."""
    x_adv0 = tf.clip_by_value(x + delta0, 0.0, 1.0)

    def body(i, x_adv):
        grad = _input_gradient(model, x_adv, y)
        x_next = _project(x_adv + step_size * tf.sign(grad), x, eps)
        return i + 1, x_next

    n = tf.shape(x)[0]  # an empty batch skips the loop (oneDNN convolutions reject B = 0)
    _, x_adv = tf.while_loop(
        lambda i, _: (i < steps) & (n > 0),
        body,
        (tf.constant(0), x_adv0),
        shape_invariants=(tf.TensorShape([]), x.shape),
    )
    return x_adv


def _check(eps: float, steps: int, step_size: float) -> None:
    AttackConfig(eps=eps, steps=steps, step_size=step_size).validate()


def make_perturb_fn(cfg: AttackConfig, seed: int = 0) -> PerturbFn:
    """A pure-TF `perturb(model, x, y) -> x_adv` for use inside a `@tf.function` train step.

    `cfg.method == "pgd"`: optional uniform random start in the eps-ball, `cfg.steps` signed
    gradient steps of `cfg.step_size`, each projected to the eps-ball and [0, 1] (a `tf.while_loop`).
    `cfg.method == "fgsm_rs"` (Wong et al. 2020): uniform start in the eps-ball, one signed step
    of `cfg.step_size` (use 1.25 * eps), projection. The loss is sparse softmax cross-entropy on
    `model(x, training=False)` logits. The output is `tf.stop_gradient`-ed. x: float32
    (B, 28, 28, 1) in [0, 1] (B may be dynamic or 0); y: integer labels (B,).

    The attack runs through the model in its own precision (a mixed_bfloat16 model attacks in
    bfloat16); its logits are cast to float32, the input gradient is taken with respect to the
    float32 `x`, so it, the steps and `x_adv` are float32 in [0, 1].

    The returned function carries `perturb.eps_scale`, a `tf.Variable` (1.0) that multiplies
    eps and the step size: the training loop ramps it up during `cfg.eps_warmup` epochs.

    Random starts are stateless (`tf.random.stateless_uniform`) keyed by `perturb.seed`, an int64
    `tf.Variable` [seed, counter] whose counter advances by one per call: the training loop sets
    it at the start of every epoch from (run seed, epoch), so a run resumed from a checkpoint in a
    new process draws exactly the starts the uninterrupted run drew.
    """
    cfg.validate()
    eps, step_size = float(cfg.eps), float(cfg.step_size)
    steps = 1 if cfg.method == "fgsm_rs" else int(cfg.steps)
    random_start = True if cfg.method == "fgsm_rs" else bool(cfg.random_start)

    eps_scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="eps_scale")
    seed_var = tf.Variable([int(seed), 0], trainable=False, dtype=tf.int64, name="perturb_seed")

    def perturb(model: keras.Model, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        x = tf.convert_to_tensor(x, dtype=tf.float32)
        y = tf.cast(y, tf.int64)
        e, a = eps * eps_scale, step_size * eps_scale
        if random_start:
            key = seed_var.read_value()
            seed_var.assign_add(tf.constant([0, 1], tf.int64))
            u = tf.random.stateless_uniform(tf.shape(x), key, -1.0, 1.0, dtype=tf.float32)
            delta0 = u * e
        else:
            delta0 = tf.zeros_like(x)

        def float32_logits(images: tf.Tensor, training: bool = False) -> tf.Tensor:
            return tf.cast(model(images, training=training), tf.float32)

        x_adv = _pgd_from(float32_logits, x, y, delta0, eps=e, steps=steps, step_size=a)
        return tf.stop_gradient(x_adv)

    perturb.__name__ = f"perturb_{cfg.method}"
    perturb.eps_scale = eps_scale
    perturb.seed = seed_var
    return perturb


_ATTACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_attack_batch(
    model: keras.Model, eps: float, steps: int, step_size: float, random_start: bool, restarts: int
):
    """A `tf.function` running `restarts` PGD attacks on a batch, keeping the worst case."""
    gen = tf.random.Generator.from_seed(0)

    @tf.function(reduce_retracing=True)
    def attack_batch(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
        best = xb
        best_wrong = tf.zeros(tf.shape(yb), dtype=tf.bool)
        best_loss = tf.fill(tf.shape(yb), tf.constant(-np.inf, tf.float32))
        for _ in range(restarts):  # small Python loop: restarts are few, steps are a graph loop
            if random_start:
                delta0 = gen.uniform(tf.shape(xb), -eps, eps, dtype=tf.float32)
            else:
                delta0 = tf.zeros_like(xb)
            x_adv = _pgd_from(model, xb, yb, delta0, eps=eps, steps=steps, step_size=step_size)
            logits = model(x_adv, training=False)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits)
            wrong = tf.argmax(logits, axis=1, output_type=tf.int64) != yb
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best = tf.where(better[:, None, None, None], x_adv, best)
            best_wrong = best_wrong | wrong
            best_loss = tf.where(better, loss, best_loss)
        return best

    return attack_batch, gen


def pgd_attack(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    restarts: int = 1,
    batch_size: int = 500,
    seed: int = 0,
) -> np.ndarray:
    """L-inf PGD adversarials of `x` (numpy float32 in [0, 1]), worst case over `restarts`.

    Per example, the restart that misclassifies wins; among equals, the one with the highest
    cross-entropy. Deterministic for a given `seed`: the random starts are drawn afresh from
    `seed` on every call, so independent restarts across calls need different seeds. A model
    that outputs probabilities instead of logits is refused (ConfigError). One `tf.function`
    per call, traced once per batch shape (at most two: full batches and the remainder).
    """
    _check(eps, steps, step_size)
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(x) == 0:
        return x.copy()
    check_logits(model, x)
    key = (float(eps), int(steps), float(step_size), bool(random_start), int(restarts))
    per_model = _ATTACKS.setdefault(model, {})
    if key not in per_model:  # one graph per model and attack setting, reused across calls
        per_model[key] = _make_attack_batch(model, *key)
    attack_batch, gen = per_model[key]
    gen.reset_from_seed(int(seed))

    out = np.empty_like(x)
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        out[sl] = attack_batch(tf.constant(x[sl]), tf.constant(y[sl])).numpy()
    return out
