"""Benchmark (run on demand, not in CI): end-of-training evaluation time, before vs after issue 11.

In one process, for a non-robust model (madry_cnn, clean training) and a quickly PGD-trained one,
times `evaluate_and_log` with the end-of-training configuration (what `robustlab vanilla` /
`perturbation` run: `robustlab.commands.train.configs` defaults) twice on the same `--n` test
images (default: the whole test set):

- old: `early_exit=False`: every PGD runs all its steps, each eps-curve point attacks every
  clean-correct image (the cost before issue 11);
- new: the staged evaluation (early exit, survivors only along the eps-curve).

It prints each part's seconds, the ratio, and both runs' accuracies (the new ones are never
higher: an example broken at an intermediate PGD iterate stays broken).

    python bench/bench_eval.py                 # full test set, models trained here
    python bench/bench_eval.py --n 2000 --train-size 10000 --pgd-epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from robustlab.cli import build_parser  # noqa: E402
from robustlab.commands.train import configs  # noqa: E402
from robustlab.config import AttackConfig, EvalConfig, MixConfig, TrainConfig  # noqa: E402
from robustlab.data.mnist import load_mnist, subsample  # noqa: E402
from robustlab.evaluation.robustness import evaluate_and_log  # noqa: E402
from robustlab.models import build_model  # noqa: E402


def end_of_training_config(regime: str, eps: float) -> EvalConfig:
    """The EvalConfig a training entry point builds from its CLI defaults."""
    return replace(configs(build_parser().parse_args([regime]))[1], eps=eps)


def train(train_x, train_y, *, epochs: int, pgd_epochs: int, eps: float) -> keras.Model:
    """madry_cnn: `epochs` clean epochs, then `pgd_epochs` of PGD-7 training (eps warm-up 1)."""
    from robustlab.train.loop import fit
    from robustlab.train.methods import make_method
    from robustlab.train.mixture import Mixture, Pool

    keras.utils.set_random_seed(0)
    model = build_model("madry_cnn")
    pool = Pool(train_x, train_y, "mnist")
    cfg = TrainConfig(epochs=epochs, batch_size=128, patience=0)
    if epochs:
        fit(
            model,
            keras.optimizers.Adam(1e-3),
            Mixture(pool, MixConfig(), 128),
            cfg,
            epochs,
            validators=[],
        )
    if pgd_epochs:
        attack = AttackConfig(eps=eps, steps=7, step_size=2.5 * eps / 7)
        fit(
            model,
            keras.optimizers.Adam(1e-3),
            Mixture(pool, MixConfig(clean=0.0, ptb=1.0), 128),
            replace(cfg, epochs=pgd_epochs),
            pgd_epochs,
            validators=[],
            method=make_method(attack),
            eps_warmup=1.0,
        )
    return model


def timed_eval(model, test, cfg: EvalConfig) -> tuple[float, dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        metrics = evaluate_and_log(model, test, cfg, out_dir=Path(tmp), log=False)
        total = time.perf_counter() - t
        report = json.loads((Path(tmp) / "evaluation.json").read_text())
    return total, metrics, report


def compare(label: str, model, test, cfg: EvalConfig) -> None:
    old_t, old_m, old_r = timed_eval(model, test, replace(cfg, early_exit=False))
    new_t, new_m, new_r = timed_eval(model, test, cfg)
    print(f"\n== {label}: {len(test)} test images, eps {cfg.eps}, engine {cfg.pgd_engine}")
    for name, t, r in (("old", old_t, old_r), ("new", new_t, new_r)):
        parts = {k: round(v, 1) for k, v in r["seconds"].items()}
        print(f"{name}: {t:.1f} s; parts {parts}")
    print(f"old / new time: {old_t / new_t:.2f}x")
    for s in new_r["stages"]:
        print(
            f"  stage {s['name']:<12} {s['subset']:<10} attacked {s['n_attacked']:>5} "
            f"broken {s['n_broken']:>5} gradient steps {s['gradient_steps']} "
            f"{s['seconds']:.1f} s"
        )
    keys = [k for k in new_m if k.endswith("_acc")]
    print("accuracy old -> new: " + ", ".join(f"{k} {old_m[k]:.4f}->{new_m[k]:.4f}" for k in keys))
    print("curve old: " + str([round(a, 4) for a in old_r["curve"]["acc"]]))
    print("curve new: " + str([round(a, 4) for a in new_r["curve"]["acc"]]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=0, help="test images (0 = all 10,000)")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--train-size", type=int, default=0, help="training images (0 = all)")
    p.add_argument("--epochs", type=int, default=1, help="clean epochs of both models")
    p.add_argument("--pgd-epochs", type=int, default=2, help="PGD-7 epochs of the robust model")
    p.add_argument("--only", choices=["vanilla", "robust"], default=None)
    args = p.parse_args()

    data = load_mnist(train_size=args.train_size)
    test = subsample(data.test, args.n, seed=0)
    if args.only != "robust":
        t = time.perf_counter()
        vanilla = train(data.train.x, data.train.y, epochs=args.epochs, pgd_epochs=0, eps=args.eps)
        print(f"vanilla model trained in {time.perf_counter() - t:.0f} s", flush=True)
        compare("vanilla", vanilla, test, end_of_training_config("vanilla", args.eps))
    if args.only != "vanilla":
        t = time.perf_counter()
        robust = train(
            data.train.x, data.train.y, epochs=args.epochs, pgd_epochs=args.pgd_epochs, eps=args.eps
        )
        print(f"PGD-trained model trained in {time.perf_counter() - t:.0f} s", flush=True)
        compare("PGD-trained", robust, test, end_of_training_config("perturbation", args.eps))


if __name__ == "__main__":
    main()
