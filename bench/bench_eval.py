"""P3 benchmark (run on demand, not in CI): full-test-set PGD-40 evaluation time, ART vs robustlab.

Attacks all `--n` test images (default 10,000) with PGD-40 (eps 0.3, step 2.5 eps / 40, one
random start), once through ART's `ProjectedGradientDescent` (what `evaluate` reports) and once
through robustlab's TF `pgd_attack`. With `--default-eval`, also times one default
`evaluate_and_log` (EvalConfig() defaults, no MLflow logging) on the same images.

    python bench/bench_eval.py                      # a madry_cnn trained 1 clean epoch here
    python bench/bench_eval.py --model-uri runs:/<id>/model --default-eval
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from robustlab.attacks import make_attack, make_classifier, pgd_attack  # noqa: E402
from robustlab.config import EvalConfig  # noqa: E402
from robustlab.data.mnist import load_mnist  # noqa: E402
from robustlab.models import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model-uri", default="", help="a logged model (default: train madry_cnn 1 epoch here)"
    )
    p.add_argument("--n", type=int, default=10_000, help="test images to attack")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument(
        "--default-eval", action="store_true", help="also time one default evaluate_and_log"
    )
    args = p.parse_args()

    data = load_mnist(train_size=10_000)
    if args.model_uri:
        from robustlab.tracking import configure_tracking, load_keras_model

        configure_tracking()
        model = load_keras_model(args.model_uri)
    else:
        keras.utils.set_random_seed(0)
        model = build_model("madry_cnn")
        model.compile(
            optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        model.fit(data.train.x, data.train.y, batch_size=128, epochs=1, verbose=0)
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    step = 2.5 * args.eps / 40
    bs = args.batch_size

    def acc(images) -> float:
        return float(
            (np.asarray(model.predict(images, batch_size=1000, verbose=0)).argmax(1) == y).mean()
        )

    print(
        f"madry_cnn, {len(y)} test images, PGD-40 eps {args.eps} step {step:g}, batch {bs}, "
        f"clean acc {acc(x):.4f}",
        flush=True,
    )
    clf = make_classifier(model)
    make_attack("pgd", clf, eps=args.eps, steps=1, batch_size=bs).generate(
        x[:bs], y[:bs]
    )  # warm-up
    t = time.perf_counter()
    adv = make_attack(
        "pgd", clf, eps=args.eps, steps=40, step_size=step, restarts=1, batch_size=bs
    ).generate(x, y)
    t_art = time.perf_counter() - t
    print(
        f"ART ProjectedGradientDescent: {t_art:.1f} s ({len(y) / t_art:.0f} img/s), robust acc {acc(adv):.4f} "
        f"(P3 target <= 180 s)",
        flush=True,
    )
    pgd_attack(
        model, x[:bs], y[:bs], eps=args.eps, steps=1, step_size=step, batch_size=bs
    )  # warm-up
    t = time.perf_counter()
    adv = pgd_attack(model, x, y, eps=args.eps, steps=40, step_size=step, batch_size=bs)
    t_tf = time.perf_counter() - t
    print(
        f"robustlab pgd_attack: {t_tf:.1f} s ({len(y) / t_tf:.0f} img/s), robust acc {acc(adv):.4f}; "
        f"ART / robustlab time {t_art / t_tf:.2f}x",
        flush=True,
    )

    if args.default_eval:
        from robustlab.evaluation.robustness import evaluate_and_log

        test = data.test.take(np.arange(len(y)))
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            metrics = evaluate_and_log(
                model, test, EvalConfig(eps=args.eps), out_dir=Path(tmp), log=False
            )
            total = time.perf_counter() - t
            import json

            seconds = json.loads((Path(tmp) / "evaluation.json").read_text())["seconds"]
        print(
            f"default evaluate_and_log: {total:.0f} s; per part { ({k: round(v) for k, v in seconds.items()}) }"
        )
        print(
            {k: round(v, 4) for k, v in metrics.items() if not k.endswith(("_ci_low", "_ci_high"))}
        )


if __name__ == "__main__":
    main()
