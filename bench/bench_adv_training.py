"""P1 benchmark (run on demand, not in CI): Madry PGD adversarial-training throughput vs ART.

Everything in one process, side by side: the same madry_cnn weights, the same `--batches` MNIST
training batches of 128 (every row attacked, as in Madry et al.), eps 0.3, PGD step 0.01, Adam.
Each side first runs one warm-up batch (tracing) that is not timed; then, `--repeats` times, the
three sides run the same batches one after the other (interleaved, so that a load change on the
shared machine hits all three); the figure per side is the median seconds per batch.

- ART: `AdversarialTrainerMadryPGD` (PGD-40, `nb_epochs=1` over the fixed batches) on a
  `TensorFlowV2Classifier` given a compiled `train_step` (`tf.function`, so that ART does not
  retrace per batch) and with its PGD attack's `batch_size` set to the training batch (ART's
  default of 32 splits each batch into four attack calls): ART's fastest float32 set-up.
- robustlab float32 / mixed_bfloat16: `robustlab.train.loop.make_train_step` with
  `make_perturb_fn` (the step `robustlab perturbation` runs per batch, `float(loss)` read back
  per batch as the training loop does), the model built by `build_model(..., precision)`.
Then robustlab float32 vs mixed_bfloat16 at PGD-7 (the `perturbation` default). TensorFlow op
determinism is on, as in every run (`--deterministic 0` switches it off for all sides; measured
idle here, it changed neither precision's step time beyond noise).

Peak: GFLOP/s of a 4096 x 4096 float32 `tf.matmul` (2 n^3 FLOPs; best of 3), and of the same
product in bfloat16 for reference, measured in every repeat beside the steps (the fraction of
the peak is taken per repeat, then the median). The step's work follows the P1 formula
    FLOPs per batch = F x 3 x (steps + 1) x batch,
F = forward FLOPs per image of the conv and dense layers (2 * H_out * W_out * k_h * k_w * C_in
* C_out per convolution, 2 * n_in * n_out per dense layer; 27.8 MFLOP for madry_cnn), x 3 for
forward + backward, x (steps + 1) for the PGD steps plus the training step. The attack's
backward passes need no weight gradients, so the work actually done is nearer
F x (2 steps + 3) x batch; both fractions of the peak are printed.

    python bench/bench_adv_training.py --batches 5 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TQDM_DISABLE", "1")  # ART's progress bars

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from robustlab.config import AttackConfig  # noqa: E402
from robustlab.data.mnist import load_mnist  # noqa: E402
from robustlab.models import build_model  # noqa: E402
from robustlab.models.cnn import madry_layers  # noqa: E402
from robustlab.precision import BF16, FLOAT32, cpu_has_bf16, precision_scope  # noqa: E402
from robustlab.seeding import seed_everything  # noqa: E402
from robustlab.train.loop import make_train_step  # noqa: E402
from robustlab.train.methods import make_method  # noqa: E402

BATCH = 128
EPS, STEP_SIZE = 0.3, 0.01


def madry(precision: str, pool_first: bool) -> keras.Model:
    """madry_cnn in either layer order (issue 20: max-pool before ReLU, the same function)."""
    with precision_scope(precision):
        return keras.Sequential(madry_layers(pool_first), name="madry_cnn")


def forward_flops(model: keras.Model) -> int:
    """Forward FLOPs per image of the model's Conv2D and Dense layers (a multiply-add = 2)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, c_in, c_out = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            total += 2 * h * w * kh * kw * c_in * c_out
        elif isinstance(layer, keras.layers.Dense):
            n_in, n_out = layer.kernel.shape
            total += 2 * n_in * n_out
    return int(total)


class PeakSide:
    """The machine's peak: GFLOP/s of an n x n x n `tf.matmul` in `dtype` (best of `tries`),
    measured inside every repeat, next to the training steps, so that both see the same load."""

    def __init__(self, dtype: tf.DType, n: int = 4096, tries: int = 3):
        self.n, self.tries = n, tries
        a = tf.cast(tf.random.uniform((n, n)), dtype)
        b = tf.cast(tf.random.uniform((n, n)), dtype)
        self.product = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b), tf.float32)))

    def run(self, x=None, y=None) -> float:
        best = float("inf")
        for _ in range(self.tries):
            t = time.perf_counter()
            self.product().numpy()
            best = min(best, time.perf_counter() - t)
        return 2 * self.n**3 / best / 1e9


class RobustlabSide:
    """robustlab's adversarial-training step in one precision."""

    def __init__(
        self, weights, precision: str, steps: int, pool_first: bool = True, method: str = "pgd"
    ):
        self.model = madry(precision, pool_first)
        self.model.set_weights(weights)
        attack = AttackConfig(eps=EPS, steps=steps, step_size=STEP_SIZE, method=method)
        self.step = make_train_step(self.model, keras.optimizers.Adam(1e-3), make_method(attack))

    def run(self, x: np.ndarray, y: np.ndarray) -> float:
        """Seconds per batch over the batches of (x, y)."""
        t = time.perf_counter()
        for i in range(0, len(x), BATCH):
            xb, yb = tf.constant(x[i : i + BATCH]), tf.constant(y[i : i + BATCH].astype(np.int64))
            loss, _ = self.step(xb, yb, tf.constant(len(yb), tf.int32))
            float(loss)  # the training loop reads the loss back every batch
        return (time.perf_counter() - t) / (len(x) // BATCH)


class ArtSide:
    """ART's AdversarialTrainerMadryPGD in its fastest float32 set-up."""

    def __init__(self, weights, steps: int, pool_first: bool = True):
        from art.defences.trainer import AdversarialTrainerMadryPGD
        from art.estimators.classification import TensorFlowV2Classifier

        model = madry(FLOAT32, pool_first)
        model.set_weights(weights)
        opt = keras.optimizers.Adam(1e-3)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function
        def train_step(m, images, labels):
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, m(images, training=True))
            grads = tape.gradient(loss, m.trainable_variables)
            opt.apply_gradients(zip(grads, m.trainable_variables, strict=True))

        clf = TensorFlowV2Classifier(
            model=model,
            nb_classes=10,
            input_shape=(28, 28, 1),
            loss_object=loss_fn,
            optimizer=opt,
            train_step=train_step,
            clip_values=(0.0, 1.0),
        )
        self.trainer = AdversarialTrainerMadryPGD(
            clf,
            nb_epochs=1,
            batch_size=BATCH,
            eps=EPS,
            eps_step=STEP_SIZE,
            max_iter=steps,
            num_random_init=1,
        )
        self.trainer.attack.set_params(batch_size=BATCH)  # attack batch = training batch

    def run(self, x: np.ndarray, y: np.ndarray) -> float:
        t = time.perf_counter()
        self.trainer.fit(x, y, nb_epochs=1, batch_size=BATCH)
        return (time.perf_counter() - t) / (len(x) // BATCH)


def timed(sides: dict, warm, x, y, repeats: int) -> dict[str, list[float]]:
    """Each side's figure (seconds per batch; GFLOP/s for a peak) per repeat: warm-up batch
    first (not kept), then the repeats, the sides interleaved within each."""
    for side in sides.values():
        side.run(*warm)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(repeats):
        for name, side in sides.items():
            times[name].append(side.run(x, y))
        print(
            f"  repeat {r + 1}: " + ", ".join(f"{n} {t[-1]:.3f}" for n, t in times.items()),
            flush=True,
        )
    return times


def median(values) -> float:
    return statistics.median(values)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", type=int, default=5, help="timed batches of 128 per side")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median) per side")
    p.add_argument(
        "--deterministic",
        type=int,
        choices=(0, 1),
        default=1,
        help="TensorFlow op determinism, on by default as in runs (one switch for all sides)",
    )
    args = p.parse_args()
    seed_everything(0, bool(args.deterministic))  # the runs' setting: same kernels as a run

    data = load_mnist(train_size=(args.batches + 1) * BATCH)
    x, y = data.train.x, data.train.y
    warm = (x[:BATCH], y[:BATCH])
    xs, ys = x[BATCH : (args.batches + 1) * BATCH], y[BATCH : (args.batches + 1) * BATCH]
    weights = build_model("madry_cnn").get_weights()
    print(
        f"tf {tf.__version__}, keras {keras.__version__}, {os.cpu_count()} cores, "
        f"CPU bf16: {cpu_has_bf16()}, op determinism {bool(args.deterministic)}, load average {os.getloadavg()[0]:.2f}; madry_cnn, eps {EPS}, "
        f"step {STEP_SIZE}, batch {BATCH}, {args.batches} batches x {args.repeats} repeats",
        flush=True,
    )

    print("PGD-40 (s/batch); relu_first = Madry's conv -> ReLU -> pool, else pool -> ReLU:")
    t40 = timed(
        {
            "art_relu_first": ArtSide(weights, 40, pool_first=False),
            "art": ArtSide(weights, 40),
            FLOAT32: RobustlabSide(weights, FLOAT32, 40),
            f"{BF16}_relu_first": RobustlabSide(weights, BF16, 40, pool_first=False),
            BF16: RobustlabSide(weights, BF16, 40),
            "trades_bf16": RobustlabSide(weights, BF16, 40, method="trades"),
            "peak_f32_gflops": PeakSide(tf.float32),
            "peak_bf16_gflops": PeakSide(tf.bfloat16),
        },
        warm,
        xs,
        ys,
        args.repeats,
    )
    print("PGD-7 (s/batch):", flush=True)
    t7 = timed(
        {FLOAT32: RobustlabSide(weights, FLOAT32, 7), BF16: RobustlabSide(weights, BF16, 7)},
        warm,
        xs,
        ys,
        args.repeats,
    )
    fwd = forward_flops(build_model("madry_cnn"))
    p1_flops = fwd * 3 * (40 + 1) * BATCH
    tight_flops = fwd * (2 * 40 + 3) * BATCH
    peaks = t40["peak_f32_gflops"]
    # fraction of the peak measured in the same repeat, then the median over repeats
    p1_frac = median(p1_flops / t / 1e9 / pk for t, pk in zip(t40[FLOAT32], peaks, strict=True))
    tight_frac = median(
        tight_flops / t / 1e9 / pk for t, pk in zip(t40[FLOAT32], peaks, strict=True)
    )
    peak32, peak16 = median(peaks), median(t40["peak_bf16_gflops"])
    m = {name: median(t) for name, t in t40.items()}
    art_old, art_new = m["art_relu_first"], m["art"]
    art = min(art_old, art_new)  # ART's fastest float32 set-up, whichever layer order
    f32, b16, b16_old, trades = m[FLOAT32], m[BF16], m[f"{BF16}_relu_first"], m["trades_bf16"]
    t7 = {name: median(t) for name, t in t7.items()}
    print(
        f"\nPGD-40, batch {BATCH}, median s/batch: ART AdversarialTrainerMadryPGD relu-first "
        f"{art_old:.3f}, pool-first {art_new:.3f}; robustlab float32 {f32:.3f}, "
        f"mixed_bfloat16 relu-first {b16_old:.3f}, pool-first {b16:.3f}; "
        f"TRADES-40 mixed_bfloat16 {trades:.3f}\n"
        f"  before the reordering (relu-first on both sides): ART / robustlab bf16 "
        f"{art_old / b16_old:.2f}x\n"
        f"  after (robustlab pool-first vs ART's fastest order): float32 {art / f32:.2f}x, "
        f"mixed_bfloat16 {art / b16:.2f}x (target >= 5x); mixed_bfloat16 vs float32 "
        f"{f32 / b16:.2f}x; pool-first vs relu-first bf16 {b16_old / b16:.2f}x\n"
        f"  TRADES-40 vs PGD-40 training step (bf16): {trades / b16:.2f}x the time\n"
        f"PGD-7, batch {BATCH}, median s/batch: float32 {t7[FLOAT32]:.3f}, mixed_bfloat16 "
        f"{t7[BF16]:.3f} ({t7[FLOAT32] / t7[BF16]:.2f}x)\n"
        f"peak: float32 matmul {peak32:.0f} GFLOP/s, bfloat16 matmul {peak16:.0f} GFLOP/s\n"
        f"float32 PGD-40 step: F = {fwd / 1e6:.1f} MFLOP/image; F x 3 x 41 x {BATCH} = "
        f"{p1_flops / 1e9:.1f} GFLOP/batch -> {p1_flops / f32 / 1e9:.0f} GFLOP/s, "
        f"{p1_frac:.0%} of the float32 peak of its repeat (median; target >= 65%); "
        f"F x 83 x {BATCH} = {tight_flops / 1e9:.1f} GFLOP/batch -> {tight_frac:.0%}\n"
        f"load average at the end {os.getloadavg()[0]:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
