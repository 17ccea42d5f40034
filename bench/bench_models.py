"""Benchmark (run on demand, not in CI): TRADES-40 training step, small_cnn vs madry_cnn.

One process, side by side: each model's robustlab training step (`make_train_step` with the
TRADES method: 40 KL-ascent steps of 0.01 in the eps 0.3 ball, then CE + beta KL, the step
`robustlab perturbation --method trades` runs per batch, `float(loss)` read back per batch as
the training loop does) on the same `--batches` MNIST training batches of 128, in the training
precision `auto` resolves to on this CPU. Each side first runs one untimed warm-up batch
(tracing); then, `--repeats` times, the sides run the same batches one after the other
(interleaved, so a load change on the shared machine hits both); the figure per side is the
median seconds per batch, with the forward MFLOP per image of its conv and dense layers.

    python bench/bench_models.py --batches 3 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_adv_training import BATCH, forward_flops, timed  # noqa: E402

from robustlab.config import AttackConfig  # noqa: E402
from robustlab.data.mnist import load_mnist  # noqa: E402
from robustlab.models import build_model  # noqa: E402
from robustlab.precision import resolve_precision  # noqa: E402
from robustlab.seeding import seed_everything  # noqa: E402
from robustlab.train.loop import make_train_step  # noqa: E402
from robustlab.train.methods import make_method  # noqa: E402

MODELS = ("small_cnn", "madry_cnn")


class TradesSide:
    """robustlab's TRADES-`steps` training step on a fresh `name` model (SGD momentum 0.9)."""

    def __init__(self, name: str, precision: str, steps: int = 40, beta: float = 6.0):
        self.model = build_model(name, precision)
        attack = AttackConfig(
            eps=0.3, steps=steps, step_size=0.01, method="trades", trades_beta=beta
        )
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        self.step = make_train_step(self.model, optimizer, make_method(attack))

    def run(self, x, y) -> float:
        t = time.perf_counter()
        for i in range(0, len(x), BATCH):
            xb, yb = tf.constant(x[i : i + BATCH]), tf.constant(y[i : i + BATCH].astype("int64"))
            loss, _ = self.step(xb, yb, tf.constant(len(yb), tf.int32))
            float(loss)
        return (time.perf_counter() - t) / (len(x) // BATCH)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", type=int, default=5, help="timed batches of 128 per side")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median) per side")
    p.add_argument("--precision", default="auto", help="auto | float32 | mixed_bfloat16")
    args = p.parse_args()
    seed_everything(0, True)
    precision = resolve_precision(args.precision)
    data = load_mnist(train_size=(args.batches + 1) * BATCH)
    x, y = data.train.x, data.train.y
    warm = (x[:BATCH], y[:BATCH])
    xs, ys = x[BATCH : (args.batches + 1) * BATCH], y[BATCH : (args.batches + 1) * BATCH]
    print(
        f"tf {tf.__version__}, {os.cpu_count()} cores, precision {precision}, load average "
        f"{os.getloadavg()[0]:.2f}; TRADES-40 (eps 0.3, step 0.01, beta 6), batch {BATCH}, "
        f"{args.batches} batches x {args.repeats} repeats",
        flush=True,
    )
    times = timed({m: TradesSide(m, precision) for m in MODELS}, warm, xs, ys, args.repeats)
    med = {m: statistics.median(t) for m, t in times.items()}
    flops = {m: forward_flops(build_model(m)) / 1e6 for m in MODELS}
    steps_per_epoch = 55_000 // BATCH
    print(
        "\nTRADES-40, median s/batch: "
        + ", ".join(f"{m} {med[m]:.3f} ({flops[m]:.1f} MFLOP/image fwd)" for m in MODELS)
        + f"\n  small_cnn / madry_cnn time: {med['small_cnn'] / med['madry_cnn']:.2f}x; one "
        f"55,000-image epoch ({steps_per_epoch} batches): "
        + ", ".join(f"{m} {med[m] * steps_per_epoch / 60:.0f} min" for m in MODELS)
        + f"\nload average at the end {os.getloadavg()[0]:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
