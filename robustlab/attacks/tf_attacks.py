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
is broken. It computes in fixed chunks of ROW_CHUNK rows, so an example never broken follows the
full run's trajectory bit for bit, whichever examples share its batch.
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


def kl_divergence(p_logits: tf.Tensor, q_logits: tf.Tensor) -> tf.Tensor:
    """Per-example KL(softmax(p) || softmax(q)) from logits (float32)."""
    log_p = tf.nn.log_softmax(p_logits, axis=-1)
    log_q = tf.nn.log_softmax(q_logits, axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def _kl_input_gradient(model: keras.Model, x: tf.Tensor, clean_logits: tf.Tensor) -> tf.Tensor:
    """d(sum of KL(f(x_clean) || f(x)))/dx, the clean distribution held fixed (TRADES)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(kl_divergence(clean_logits, model(x, training=False)))
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
    gradient: Callable[[keras.Model, tf.Tensor, tf.Tensor], tf.Tensor] = _input_gradient,
) -> tf.Tensor:
    """`steps` projected signed-gradient steps starting at clip(x + delta0) (graph loop, not
    unrolled), ascending `gradient(model, x_adv, y)` (default: the cross-entropy's)."""
    x_adv0 = tf.clip_by_value(x + delta0, 0.0, 1.0)

    def body(i, x_adv):
        grad = gradient(model, x_adv, y)
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


# every forward/backward pass of `pgd_attack` runs on chunks of exactly this many rows (padded),
# so an example's float32 arithmetic does not depend on how many others share its batch (oneDNN
# picks its summation order by batch size): early exit, survivor chaining and a full run then
# follow the same per-example trajectory bit for bit. 128 rows ran as fast per row as 500 here.
ROW_CHUNK = 128


def _logits_and_gradient(model: keras.Model, x: tf.Tensor, y: tf.Tensor):
    """(logits, d(sum of cross-entropies)/dx) of x, computed ROW_CHUNK rows at a time."""
    m = tf.shape(x)[0]
    pad = (ROW_CHUNK - m % ROW_CHUNK) % ROW_CHUNK
    xp = tf.concat([x, tf.zeros(tf.concat([[pad], tf.shape(x)[1:]], 0), x.dtype)], 0)
    yp = tf.concat([y, tf.zeros([pad], y.dtype)], 0)
    chunks = tf.shape(xp)[0] // ROW_CHUNK

    def one(args):
        xc, yc = args
        with tf.GradientTape() as tape:
            tape.watch(xc)
            logits = model(xc, training=False)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(yc, logits))
        return logits, tape.gradient(loss, xc)

    logits, grad = tf.map_fn(
        one,
        (
            tf.reshape(xp, tf.concat([[chunks, ROW_CHUNK], tf.shape(x)[1:]], 0)),
            tf.reshape(yp, [chunks, ROW_CHUNK]),
        ),
        fn_output_signature=(tf.float32, tf.float32),
        parallel_iterations=1,
    )
    logits = tf.reshape(logits, [-1, tf.shape(logits)[-1]])[:m]
    grad = tf.reshape(grad, tf.concat([[-1], tf.shape(x)[1:]], 0))[:m]
    return logits, grad


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
    early_exit: bool = True,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`_pgd_from` that stops attacking an example once the model misclassifies it.

    Each step computes the logits and the input gradient of the examples not yet broken (`done`
    False; `done0` marks examples to leave alone from the start) in one forward/backward pass
    (`_logits_and_gradient`); an example whose current iterate is misclassified is frozen there
    and leaves the batch. The loop ends after `steps` steps or when every example is broken.
    `early_exit=False` runs every step on every example (nothing frozen), with the same
    arithmetic. Returns (x_adv, iterations, rows): rows = examples pushed through the model,
    summed over iterations (gradient steps, padding excluded).
    """
    x_adv0 = tf.clip_by_value(x + delta0, 0.0, 1.0)

    def body(i, x_adv, done, rows):
        n_active = tf.reduce_sum(tf.cast(~done, tf.int32))
        sel = tf.argsort(tf.cast(done, tf.int32), stable=True)[:n_active]  # the active rows
        xa, ya, xs = tf.gather(x_adv, sel), tf.gather(y, sel), tf.gather(x, sel)
        logits, grad = _logits_and_gradient(model, xa, ya)
        stepped = _project(xa + step_size * tf.sign(grad), xs, eps)
        if early_exit:
            broken = tf.argmax(logits, axis=1, output_type=tf.int64) != ya
            stepped = tf.where(broken[:, None, None, None], xa, stepped)
            done = tf.tensor_scatter_nd_update(done, sel[:, None], broken)
        x_adv = tf.tensor_scatter_nd_update(x_adv, sel[:, None], stepped)
        return i + 1, x_adv, done, rows + n_active

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


TRADES_START_STD = 0.001  # TRADES' random start: x + 0.001 * N(0, 1) (Zhang et al. 2019)


def make_perturb_fn(cfg: AttackConfig, seed: int = 0) -> PerturbFn:
    """A pure-TF `perturb(model, x, y) -> x_adv` for use inside a `@tf.function` train step.

    `cfg.method == "pgd"`: optional uniform random start in the eps-ball, `cfg.steps` signed
    gradient steps of `cfg.step_size`, each projected to the eps-ball and [0, 1] (a `tf.while_loop`).
    `cfg.method == "fgsm_rs"` (Wong et al. 2020): uniform start in the eps-ball, one signed step
    of `cfg.step_size` (use 1.25 * eps), projection. The loss of both is sparse softmax
    cross-entropy on `model(x, training=False)` logits. `cfg.method == "trades"` (Zhang et al.
    2019): start at x + 0.001 N(0, 1), `cfg.steps` signed steps ascending
    KL(f(x) || f(x')) with f(x) the (fixed) clean softmax, each projected likewise; `y` is unused.
    The output is `tf.stop_gradient`-ed. x: float32 (B, 28, 28, 1) in [0, 1] (B may be dynamic
    or 0); y: integer labels (B,).

    The attack runs through the model in its own precision (a mixed_bfloat16 model attacks in
    bfloat16); its logits are cast to float32, the input gradient is taken with respect to the
    float32 `x`, so it, the steps and `x_adv` are float32 in [0, 1].

    The returned function carries `perturb.eps_scale`, a `tf.Variable` (1.0) that multiplies
    eps and the step size: the training loop ramps it up during `cfg.eps_warmup` epochs.

    Random starts are stateless (`tf.random.stateless_uniform` / `stateless_normal`) keyed by
    `perturb.seed`, an int64 `tf.Variable` [seed, counter] whose counter advances by one per
    call: the training loop sets it at the start of every epoch from (run seed, epoch), so a run
    resumed from a checkpoint in a new process draws exactly the starts the uninterrupted run drew.
    """
    cfg.validate()
    eps, step_size = float(cfg.eps), float(cfg.step_size)
    steps = 1 if cfg.method == "fgsm_rs" else int(cfg.steps)
    random_start = True if cfg.method in ("fgsm_rs", "trades") else bool(cfg.random_start)
    trades = cfg.method == "trades"

    eps_scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="eps_scale")
    seed_var = tf.Variable([int(seed), 0], trainable=False, dtype=tf.int64, name="perturb_seed")

    def perturb(model: keras.Model, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        x = tf.convert_to_tensor(x, dtype=tf.float32)
        y = tf.cast(y, tf.int64)
        e, a = eps * eps_scale, step_size * eps_scale
        if random_start:
            key = seed_var.read_value()
            seed_var.assign_add(tf.constant([0, 1], tf.int64))
            if trades:
                delta0 = TRADES_START_STD * tf.random.stateless_normal(tf.shape(x), key)
            else:
                u = tf.random.stateless_uniform(tf.shape(x), key, -1.0, 1.0, dtype=tf.float32)
                delta0 = u * e
        else:
            delta0 = tf.zeros_like(x)

        def float32_logits(images: tf.Tensor, training: bool = False) -> tf.Tensor:
            return tf.cast(model(images, training=training), tf.float32)

        if trades:  # the clean distribution is the fixed target of the KL
            target = tf.stop_gradient(float32_logits(x))
            x_adv = _pgd_from(
                float32_logits,
                x,
                target,
                delta0,
                eps=e,
                steps=steps,
                step_size=a,
                gradient=_kl_input_gradient,
            )
        else:
            x_adv = _pgd_from(float32_logits, x, y, delta0, eps=e, steps=steps, step_size=a)
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
    restart runs all steps on every example (same arithmetic, chunked by ROW_CHUNK). With
    `given_starts` (one restart), the random start is the call's `ub` (uniform in [-1, 1]) x eps
    instead of a draw from the generator.
    """
    gen = tf.random.Generator.from_seed(0)
    # the cache in _ATTACKS holds this function weakly by its model; a strong reference from the
    # closure would keep every attacked model (and its graphs) alive for the whole process
    model_ref = weakref.ref(model)

    @tf.function(reduce_retracing=True)
    def attack_batch(
        xb: tf.Tensor, yb: tf.Tensor, ub: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        model = model_ref()  # alive: traced only from a call that passes the model
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
            x_adv, it, r = _pgd_early_exit(
                model,
                xb,
                yb,
                delta0,
                best_wrong if early_exit else tf.zeros(tf.shape(yb), tf.bool),
                eps=eps,
                steps=steps,
                step_size=step_size,
                early_exit=early_exit,
            )
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


def clear_attack_cache() -> None:
    """Forget every cached attack graph (a worker between two trained models)."""
    _ATTACKS.clear()
