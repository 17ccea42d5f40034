"""Benchmark (run on demand, not in CI): the cost of TensorFlow op determinism for training.

Times one clean (`vanilla`) epoch of `madry_cnn` on all 55,000 training images through the
training loop, alternating op determinism on and off in one process (a fresh model, optimizer and
traced train step per trial, seeded by `seed_everything`), and prints the median of each. It also
says whether every trial of a mode ended with bitwise identical weights (same seed, same mode).

    python bench/bench_seeding.py               # 3 trials each (about 2 minutes on a quiet machine)
    python bench/bench_seeding.py --trials 2 --train-size 20000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from robustlab.config import MixConfig, TrainConfig  # noqa: E402
from robustlab.data.mnist import load_mnist  # noqa: E402
from robustlab.models import build_model  # noqa: E402
from robustlab.seeding import op_determinism_enabled, seed_everything  # noqa: E402
from robustlab.train.loop import fit  # noqa: E402
from robustlab.train.mixture import Mixture, Pool  # noqa: E402


def one_epoch(pool: Pool, deterministic: bool, seed: int) -> tuple[float, str]:
    """Seconds for one training epoch, and a digest of the final weights."""
    seed_everything(seed, deterministic=deterministic)
    assert op_determinism_enabled() == deterministic
    model = build_model("madry_cnn")
    cfg = TrainConfig(epochs=1, batch_size=128, seed=seed)
    result = fit(
        model,
        keras.optimizers.Adam(cfg.learning_rate),
        Mixture(pool, MixConfig(), cfg.batch_size),
        cfg,
        1,
        validators=[],
        phase="bench",
    )
    digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights()))
    return result.seconds, digest.hexdigest()[:12]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=3, help="epochs per mode (alternating)")
    p.add_argument("--train-size", type=int, default=0, help="0 = all 55,000 training images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    train = load_mnist(train_size=args.train_size).train
    pool = Pool(train.x, train.y, "mnist-train")
    times: dict[bool, list[float]] = {True: [], False: []}
    digests: dict[bool, set[str]] = {True: set(), False: set()}
    for trial in range(args.trials):
        for deterministic in (True, False) if trial % 2 == 0 else (False, True):
            seconds, digest = one_epoch(pool, deterministic, args.seed)
            times[deterministic].append(seconds)
            digests[deterministic].add(digest)
            mode = "on " if deterministic else "off"
            print(f"trial {trial + 1}  op determinism {mode}  {seconds:6.1f} s  weights {digest}")
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"one clean epoch, {len(pool)} images, batch 128, madry_cnn, {os.cpu_count()} CPUs: "
        f"median {on:.1f} s with op determinism, {off:.1f} s without "
        f"({100 * (on / off - 1):+.1f}%)"
    )
    for deterministic, found in digests.items():
        mode = "on" if deterministic else "off"
        same = "bitwise identical" if len(found) == 1 else f"{len(found)} different results"
        print(f"op determinism {mode}: final weights of the {args.trials} same-seed trials {same}")


if __name__ == "__main__":
    main()
