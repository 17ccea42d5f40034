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
import tempfile
from pathlib import Path

from robustlab.commands import SubParsers, flag, optional
from robustlab.commands.eval_args import add_eval_arguments, eval_config, summary_line
from robustlab.config import EvalConfig
from robustlab.errors import ConfigError


def add_parser(sub: SubParsers) -> list[str]:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a logged model's robustness with ART attacks and log it to MLflow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model-uri", required=True, help="runs:/<run_id>/model or models:/<name>@<alias>"
    )
    add_eval_arguments(p)
    p.add_argument(
        "--data-dir",
        type=optional,
        default=None,
        help="folder with mnist.npz (default $ROBUSTLAB_DATA_DIR)",
    )
    p.add_argument("--run-name", type=optional, default=None)
    p.add_argument(
        "--allow-unknown-provenance",
        type=flag,
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
    return eval_config(args)


def run(args: argparse.Namespace) -> dict[str, float]:
    # everything that can be checked without the tracking store is checked before a run exists
    cfg = config_from_args(args)
    import mlflow

    from robustlab.attacks.checks import check_logits
    from robustlab.data.mnist import load_mnist, subsample
    from robustlab.evaluation.robustness import check_eval_inputs, evaluate_and_log
    from robustlab.evaluation.validation import human_pool_accuracy
    from robustlab.provenance import excluded_sources_of
    from robustlab.register.publish import record_evaluation
    from robustlab.tracking import (
        configure_tracking,
        load_keras_model,
        start_run,
    )

    mnist = load_mnist(args.data_dir)
    configure_tracking()
    model = load_keras_model(args.model_uri)
    excluded = excluded_sources_of(args.model_uri, bool(args.allow_unknown_provenance))
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
        human = human_pool_accuracy(model, excluded, args.data_dir)
        mlflow.log_metrics(human)
        metrics.update(human)
        version = record_evaluation(args.model_uri, r.info.run_id, metrics)
        if version is not None:
            mlflow.set_tag("robustlab.registered_version", version)
        print(f"evaluate: run {r.info.run_id}: " + summary_line(metrics, cfg))
    return metrics
