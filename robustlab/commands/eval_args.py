"""The evaluation options `evaluate` and `register` share, and the one place they become an
EvalConfig (its checks and the attack registry's)."""

from __future__ import annotations

import argparse

from robustlab.attacks.registry import OPTIONAL_STAGES, STAGES, check_eval_config
from robustlab.config import EvalConfig
from robustlab.errors import ConfigError


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_eval_arguments(p: argparse.ArgumentParser, *, pgd_engine: str = "art") -> None:
    """Strong-attack options (defaults: the full `evaluate`/`register` evaluation)."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--eps", type=float, default=0.3, help="L-inf budget in [0, 1] (default 0.3)")
    g.add_argument(
        "--eval-size", type=int, default=0, help="test images (0 = all minus excluded sources)"
    )
    g.add_argument(
        "--autoattack-size", type=int, default=1000, help="AutoAttack/Square subset (0 = skip)"
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--pgd-restarts",
        type=int,
        default=5,
        help="random restarts of PGD-S (default 5; 0 = PGD-40 only)",
    )
    g.add_argument(
        "--pgd-steps",
        type=int,
        default=100,
        help="steps S of each restart (default 100), e.g. --pgd-steps 40 --pgd-restarts 10",
    )
    g.add_argument(
        "--pgd-engine",
        default=pgd_engine,
        help="PGD implementation: art (the independent cross-check against ART's PGD) or "
        "robustlab (in-graph with early exit, what training runs use; same attack, faster)",
    )
    g.add_argument(
        "--extra-attacks",
        type=_names,
        default=(),
        help="comma-separated optional attacks of the registry to run too: "
        + (", ".join(f"{n} ({STAGES[n].label(EvalConfig())})" for n in OPTIONAL_STAGES) or "none"),
    )
    g.add_argument(
        "--curve-size", type=int, default=1000, help="images on the accuracy-vs-eps curve"
    )
    g.add_argument("--curve-points", type=int, default=9, help="eps values on the curve (0 to 0.4)")
    g.add_argument("--batch-size", type=int, default=500, help="attack batch size (default 500)")
    g.add_argument(
        "--square-queries", type=int, default=5000, help="Square's query budget (default 5000)"
    )


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig of `add_eval_arguments`' options, checked (one-line ConfigError)."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    cfg = EvalConfig(
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
        extra_attacks=tuple(args.extra_attacks),
    )
    return check_eval_config(cfg.validate())


def summary_line(metrics: dict[str, float], cfg: EvalConfig) -> str:
    """The accuracies that were measured, e.g. `clean 0.9900, PGD-40 0.9000, AutoAttack 0.8800`."""
    names = [("test/clean_acc", "clean")]
    names += [(e.metric(cfg), e.label(cfg)) for e in STAGES.values() if e.metric(cfg)]
    names += [
        ("test/human_pool_acc_changed", "human labels: label-changed"),
        ("test/human_pool_acc_kept", "label-kept"),
        ("test/human_pool_bal_acc", "balanced"),
    ]
    return ", ".join(f"{label} {metrics[k]:.4f}" for k, label in names if k in metrics)
