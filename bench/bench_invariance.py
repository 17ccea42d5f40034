"""P4 benchmark: our L∞ invariance generator vs the reference approach, same 50 sources.

The reference fits scikit-learn `NearestNeighbors` per class and queries the 775 transformed
copies of each source against every class ≠ y (like Tramèr et al.'s notebook). Both produce
identical images and target labels (asserted). Run on demand:

    ROBUSTLAB_DATA_DIR=../shared/data python bench/bench_invariance.py [--n 50] [--threads 1]

Prints seconds/image for both (set-up — fitting / building the pool — excluded and printed
separately) and the speed-up. `--threads` limits the reference's BLAS/OpenMP threads (default
1; 0 = library default); ours always runs BLAS single-threaded.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from robustlab.data.mnist import load_raw_mnist
from robustlab.invariance.generator import TrainingPool, generate_linf, reference_linf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="source images (MNIST test 0..n-1)")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS/OpenMP threads for the reference (0 = library default); ours always uses 1",
    )
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    raw = load_raw_mnist(args.data_dir, download=False)
    x, y = raw.x_test[: args.n], raw.y_test[: args.n]
    limits = threadpool_limits(args.threads) if args.threads else None

    t0 = time.perf_counter()
    pool = TrainingPool(raw.x_train, raw.y_train)
    setup_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = generate_linf(x, y, [args.eps], pool)
    t_ours = (time.perf_counter() - t0) / args.n

    t0 = time.perf_counter()
    ref_img, ref_tgt, setup_ref = reference_linf(
        x, y, args.eps, raw.x_train, raw.y_train, timed=True
    )
    t_ref = (time.perf_counter() - t0 - setup_ref) / args.n
    if limits is not None:
        limits.unregister()

    assert np.array_equal(ours.images[0], ref_img), "images differ from the reference"
    assert np.array_equal(ours.target_label[0], ref_tgt), "target labels differ from the reference"
    print(
        f"{args.n} MNIST test images, eps={args.eps:g}, reference threads={args.threads or 'default'}"
    )
    print(f"outputs identical: {args.n}/{args.n} images and target labels")
    print(
        f"reference (sklearn NearestNeighbors per class): {t_ref:.3f} s/image (+{setup_ref:.1f} s fit)"
    )
    print(
        f"ours (vectorised, pruned exact search):         {t_ours:.3f} s/image (+{setup_ours:.1f} s pool)"
    )
    print(f"speed-up: {t_ref / t_ours:.1f}x")


if __name__ == "__main__":
    main()
