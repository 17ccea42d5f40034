"""`robustlab evaluate`: robustness of a logged model under strong attacks, logged to its own run.

On the MNIST test set minus the model's excluded source images (then a seeded subset of
`--eval-size`, 0 = all): clean accuracy, PGD-40, PGD-S x R (`--pgd-steps` S, default 100;
`--pgd-restarts` R independent random restarts, each on the survivors), ART's AutoAttack and
Square on a seeded subset of `--autoattack-size` (0 skips them), an accuracy-vs-eps curve and a
clean-vs-adversarial grid; every accuracy with a 95% interval. PGD runs through ART by default
(`--pgd-engine art`): `evaluate` is the independent cross-check of the end-of-training
evaluation, which uses robustlab's in-graph PGD with early exit (`--pgd-engine robustlab`).
Artifacts: evaluation.json (with every stage's cost), evaluation.md, eps_curve.png,
adversarial_examples.png. See `robustlab.evaluation.robustness.evaluate_and_log`.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from robustlab.commands import optional
from robustlab.config import EvalConfig
from robustlab.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> list[str]:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a logged model's robustness with ART attacks and log it to MLflow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model-uri", required=True, help="runs:/<run_id>/model or models:/<name>@<alias>"
    )
    p.add_argument(
        "--eval-size", type=int, default=0, help="test images (0 = all minus excluded sources)"
    )
    p.add_argument(
        "--autoattack-size", type=int, default=1000, help="AutoAttack/Square subset (0 = skip)"
    )
    p.add_argument("--eps", type=float, default=0.3, help="L-inf budget in [0, 1] (default 0.3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pgd-restarts",
        type=int,
        default=5,
        help="random restarts of PGD-S (default 5; 0 = PGD-40 only)",
    )
    p.add_argument(
        "--pgd-steps",
        type=int,
        default=100,
        help="steps S of each restart (default 100), e.g. --pgd-steps 40 --pgd-restarts 10",
    )
    p.add_argument(
        "--pgd-engine",
        default="art",
        help="PGD implementation: art (default: the independent cross-check against ART's PGD) "
        "or robustlab (in-graph with early exit, what training runs use; same attack, faster)",
    )
    p.add_argument(
        "--curve-size", type=int, default=1000, help="images on the accuracy-vs-eps curve"
    )
    p.add_argument("--curve-points", type=int, default=9, help="eps values on the curve (0 to 0.4)")
    p.add_argument("--batch-size", type=int, default=500, help="attack batch size (default 500)")
    p.add_argument(
        "--data-dir",
        type=optional,
        default=None,
        help="folder with mnist.npz (default $ROBUSTLAB_DATA_DIR)",
    )
    p.add_argument(
        "--square-queries", type=int, default=5000, help="Square's query budget (default 5000)"
    )
    p.add_argument("--run-name", type=optional, default=None)
    p.add_argument(
        "--allow-unknown-provenance",
        type=lambda t: t.strip().lower() in ("1", "true", "yes", "on"),
        nargs="?",
        const=True,
        default=False,
        help="evaluate a model whose excluded test images are unknown (recorded on the run)",
    )
    p.set_defaults(func=run)
    return ["evaluate"]


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    if not args.model_uri or not args.model_uri.strip():
        raise ConfigError("--model-uri is empty; pass e.g. runs:/<run_id>/model")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    return EvalConfig(
        eps=args.eps,
        eval_size=args.eval_size,
        autoattack_size=args.autoattack_size,
        pgd_restarts=args.pgd_restarts,
        seed=args.seed,
        batch_size=args.batch_size,
        square_queries=args.square_queries,
        pgd_engine=args.pgd_engine,
        pgd_steps=args.pgd_steps,
        curve_size=args.curve_size,
        curve_points=args.curve_points,
    ).validate()


def run(args: argparse.Namespace) -> dict[str, float]:
    # everything that can be checked without the tracking store is checked before a run exists
    cfg = config_from_args(args)
    from robustlab.attacks.checks import check_logits
    from robustlab.data.mnist import load_mnist, subsample
    from robustlab.evaluation.robustness import check_eval_inputs, evaluate_and_log
    from robustlab.tracking import (
        configure_tracking,
        excluded_sources_of,
        load_keras_model,
        start_run,
    )

    mnist = load_mnist(args.data_dir)
    configure_tracking()
    model = load_keras_model(args.model_uri)
    excluded = excluded_sources_of(args.model_uri, args.allow_unknown_provenance)
    test = subsample(mnist.test.without_sources(excluded), cfg.eval_size, seed=cfg.seed)
    if len(test) == 0:
        raise ConfigError("no test images left after removing the model's excluded sources")
    check_eval_inputs(test)  # evaluate_and_log checks again; here it fails before a run exists
    check_logits(model, test.x)
    params = {
        "model_uri": args.model_uri,
        "eps": cfg.eps,
        "eval_size": cfg.eval_size,
        "autoattack_size": cfg.autoattack_size,
        "pgd_restarts": cfg.pgd_restarts,
        "pgd_steps": cfg.pgd_steps,
        "pgd_engine": cfg.pgd_engine,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "n_excluded_sources": len(excluded),
        "n_eval": len(test),
        "data_digest": mnist.digest,
    }
    with start_run(
        args.run_name or "evaluate",
        params=params,
        tags={
            "robustlab.model_uri": args.model_uri,
            **(
                {"robustlab.provenance": "unknown-allowed"} if args.allow_unknown_provenance else {}
            ),
        },
    ) as r:
        with tempfile.TemporaryDirectory(prefix="robustlab-eval-") as tmp:
            metrics = evaluate_and_log(model, test, cfg, out_dir=Path(tmp), log=True)
        print(f"evaluate: run {r.info.run_id}: " + summary_line(metrics))
    return metrics


def summary_line(metrics: dict[str, float]) -> str:
    """The accuracies that were measured, e.g. `clean 0.9900, PGD-40 0.9000, AutoAttack 0.8800`."""
    names = [("test/clean_acc", "clean"), ("test/pgd40_acc", "PGD-40")]
    names += [
        (k, f"PGD-{k.removeprefix('test/pgd').removesuffix('_acc')}")
        for k in sorted(metrics)
        if re.fullmatch(r"test/pgd\d+x\d+_acc", k)
    ]
    names += [("test/autoattack_acc", "AutoAttack"), ("test/square_acc", "Square")]
    return ", ".join(f"{label} {metrics[k]:.4f}" for k, label in names if k in metrics)
