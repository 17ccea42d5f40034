"""Training-time L-inf attacks as pure TensorFlow graphs (no numpy round-trips).

`make_perturb_fn` returns a function meant to be called *inside* a `@tf.function` train step;
`pgd_attack` is a numpy convenience around the same graph for validation and benchmarks.

The computation is the one ART's `ProjectedGradientDescent` performs on a
`TensorFlowV2Classifier` wrapping the same logits (optional uniform start in the eps-ball
clipped to [0, 1], `steps` signed-gradient ascent steps of cross-entropy from logits, projection
to the eps-ball and to [0, 1] after every step, final iterate returned);
`tests/test_attacks.py::test_pgd40_matches_art` checks that both give the same robust accuracy.

`pgd_attack` (validation and evaluation, not training) exits early by default: an example is
frozen at the first iterate the model misclassifies (so it stays broken), only the examples not
yet broken are pushed through the model at each step, and a batch stops once every example in it
is broken. Examples never broken follow exactly the trajectory of the full run.
`make_perturb_fn` (training) always runs every step on every example.
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


# active examples are padded to a multiple of this many rows (with frozen ones, whose update is
# discarded), so that a batch meets few distinct shapes as it shrinks (oneDNN builds a kernel per
# shape)
ROW_BUCKET = 32


def _pgd_early_exit(
    model: keras.Model,
    x: tf.Tensor,
    y: tf.Tensor,
    delta0: tf.Tensor,
    done0: tf.Tensor,
    *,
    eps: float | tf.Tensor,
    steps: int,
    step_size: float | tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`_pgd_from` that stops attacking an example once the model misclassifies it.

    Each step computes the logits and the input gradient of the examples not yet broken (`done`
    False; `done0` marks examples to leave alone from the start) in one forward/backward pass;
    an example whose current iterate is misclassified is frozen there and leaves the batch. The
    loop ends after `steps` steps or when every example is broken. Returns (x_adv, iterations,
    rows): rows = examples pushed through the model, summed over iterations (gradient steps).
    """
    x_adv0 = tf.clip_by_value(x + delta0, 0.0, 1.0)
    n = tf.shape(x)[0]

    def body(i, x_adv, done, rows):
        n_active = tf.reduce_sum(tf.cast(~done, tf.int32))
        m = tf.minimum(n, (n_active + ROW_BUCKET - 1) // ROW_BUCKET * ROW_BUCKET)
        sel = tf.argsort(tf.cast(done, tf.int32), stable=True)[:m]  # the active rows first
        xa, ya, xs = tf.gather(x_adv, sel), tf.gather(y, sel), tf.gather(x, sel)
        with tf.GradientTape() as tape:
            tape.watch(xa)
            logits = model(xa, training=False)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(ya, logits))
        grad = tape.gradient(loss, xa)
        frozen = tf.gather(done, sel) | (tf.argmax(logits, axis=1, output_type=tf.int64) != ya)
        stepped = _project(xa + step_size * tf.sign(grad), xs, eps)
        new_rows = tf.where(frozen[:, None, None, None], xa, stepped)
        x_adv = tf.tensor_scatter_nd_update(x_adv, sel[:, None], new_rows)
        done = tf.tensor_scatter_nd_update(done, sel[:, None], frozen)
        return i + 1, x_adv, done, rows + m

    iterations, x_adv, _, rows = tf.while_loop(
        lambda i, _x, done, _r: (i < steps) & ~tf.reduce_all(done),  # all of an empty batch: done
        body,
        (tf.constant(0), x_adv0, tf.convert_to_tensor(done0), tf.constant(0)),
        shape_invariants=(
            tf.TensorShape([]),
            x.shape,
            tf.TensorShape([None]),
            tf.TensorShape([]),
        ),
    )
    return x_adv, iterations, rows


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
        x_adv = _pgd_from(model, x, y, delta0, eps=e, steps=steps, step_size=a)
        return tf.stop_gradient(x_adv)

    perturb.__name__ = f"perturb_{cfg.method}"
    perturb.eps_scale = eps_scale
    perturb.seed = seed_var
    return perturb


_ATTACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _make_attack_batch(
    model: keras.Model,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool,
    restarts: int,
    early_exit: bool = True,
    given_starts: bool = False,
):
    """A `tf.function` running `restarts` PGD attacks on a batch, keeping the worst case.

    It returns (adversarials, loop iterations, gradient rows). With `early_exit`, each restart
    attacks only the examples no earlier restart broke (`_pgd_early_exit`); without, every
    restart runs all steps on every example (`_pgd_from`, the training attack). With
    `given_starts` (one restart), the random start is the call's `ub` (uniform in [-1, 1]) x eps
    instead of a draw from the generator.
    """
    gen = tf.random.Generator.from_seed(0)

    @tf.function(reduce_retracing=True)
    def attack_batch(
        xb: tf.Tensor, yb: tf.Tensor, ub: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        best = xb
        best_wrong = tf.zeros(tf.shape(yb), dtype=tf.bool)
        best_loss = tf.fill(tf.shape(yb), tf.constant(-np.inf, tf.float32))
        iterations, rows = tf.constant(0), tf.constant(0)
        for _ in range(restarts):  # small Python loop: restarts are few, steps are a graph loop
            if random_start and given_starts:
                delta0 = tf.reshape(ub, tf.shape(xb)) * eps
            elif random_start:
                delta0 = gen.uniform(tf.shape(xb), -eps, eps, dtype=tf.float32)
            else:
                delta0 = tf.zeros_like(xb)
            if early_exit:
                x_adv, it, r = _pgd_early_exit(
                    model, xb, yb, delta0, best_wrong, eps=eps, steps=steps, step_size=step_size
                )
            else:
                x_adv = _pgd_from(model, xb, yb, delta0, eps=eps, steps=steps, step_size=step_size)
                it, r = tf.constant(steps), steps * tf.shape(xb)[0]
            iterations, rows = iterations + it, rows + r
            logits = model(x_adv, training=False)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits)
            wrong = tf.argmax(logits, axis=1, output_type=tf.int64) != yb
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            if early_exit:  # an example broken by an earlier restart keeps that adversarial
                better &= ~best_wrong
            best = tf.where(better[:, None, None, None], x_adv, best)
            best_wrong = best_wrong | wrong
            best_loss = tf.where(better, loss, best_loss)
        return best, iterations, rows

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
    early_exit: bool = True,
    stats: dict[str, int] | None = None,
    starts: np.ndarray | None = None,
) -> np.ndarray:
    """L-inf PGD adversarials of `x` (numpy float32 in [0, 1]), worst case over `restarts`.

    Per example, the restart that misclassifies wins; among equals, the one with the highest
    cross-entropy. `early_exit` (default) freezes an example at the first iterate that is
    misclassified, steps only the others and ends a batch when all are broken (later restarts
    attack only the survivors); `early_exit=False` runs every step on every example (the cost
    before issue 11). `stats`, when given, gains "iterations" (loop steps, summed over batches
    and restarts) and "gradient_steps" (examples pushed through a forward/backward pass).

    Deterministic for a given `seed`: the random starts are drawn afresh from `seed` on every
    call, so independent restarts across calls need different seeds. `starts` (x's shape,
    uniform in [-1, 1], one restart only) gives each example its start instead: scaled by eps,
    it does not depend on the batch the example lands in (the staged evaluation passes rows of
    one draw per stage, so a chained stage starts each survivor where it would start alone). A model
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
    if starts is not None:
        starts = np.asarray(starts, dtype=np.float32)
        if starts.shape != x.shape or restarts != 1:
            raise ConfigError("starts must have the images' shape and restarts must be 1")
    if len(x) == 0:
        return x.copy()
    check_logits(model, x)
    key = (
        float(eps),
        int(steps),
        float(step_size),
        bool(random_start),
        int(restarts),
        bool(early_exit),
        starts is not None,
    )
    per_model = _ATTACKS.setdefault(model, {})
    if key not in per_model:  # one graph per model and attack setting, reused across calls
        per_model[key] = _make_attack_batch(model, *key)
    attack_batch, gen = per_model[key]
    gen.reset_from_seed(int(seed))

    out = np.empty_like(x)
    iterations = rows = 0
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        ub = tf.constant(starts[sl]) if starts is not None else tf.zeros((0,), tf.float32)
        adv, it, r = attack_batch(tf.constant(x[sl]), tf.constant(y[sl]), ub)
        out[sl] = adv.numpy()
        iterations, rows = iterations + int(it), rows + int(r)
    if stats is not None:
        stats["iterations"] = stats.get("iterations", 0) + iterations
        stats["gradient_steps"] = stats.get("gradient_steps", 0) + rows
    return out
