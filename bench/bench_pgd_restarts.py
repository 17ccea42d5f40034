"""PGD-40 with R random restarts on the whole test set (minus excluded sources), run on demand.

The figure behind target P2 ("PGD-40 with 10 restarts"). It uses robustlab's TF PGD, which
`tests/test_attacks.py` checks against ART's `ProjectedGradientDescent` (same per-example
outcomes), because R × 40 steps through ART would take R times the P3 evaluation. Each restart
attacks only the images still classified correctly, which gives the same robust accuracy as
attacking all of them every time.

    python bench/bench_pgd_restarts.py --model-uri runs:/<id>/model [--restarts 10]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from robustlab.attacks import pgd_attack  # noqa: E402
from robustlab.data.mnist import load_mnist  # noqa: E402
from robustlab.evaluation.stats import accuracy, predict_logits  # noqa: E402
from robustlab.provenance import excluded_sources_of  # noqa: E402
from robustlab.tracking import configure_tracking, load_keras_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-uri", required=True)
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    configure_tracking()
    model = load_keras_model(args.model_uri)
    test = load_mnist().test.without_sources(excluded_sources_of(args.model_uri))
    t0 = time.perf_counter()
    robust = predict_logits(model, test.x).argmax(1) == test.y
    print(f"clean: {accuracy(robust).value:.4f} on {len(test)} images")
    step = 2.5 * args.eps / args.steps
    for r in range(args.restarts):
        idx = np.flatnonzero(robust)
        adv = pgd_attack(
            model,
            test.x[idx],
            test.y[idx],
            eps=args.eps,
            steps=args.steps,
            step_size=step,
            random_start=True,
            seed=1000 + r,
        )
        robust[idx[predict_logits(model, adv).argmax(1) != test.y[idx]]] = False
        acc = accuracy(robust)
        print(
            f"PGD-{args.steps} x{r + 1}: {acc.value:.4f} [{acc.ci_low:.4f}, {acc.ci_high:.4f}]"
            f"  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
