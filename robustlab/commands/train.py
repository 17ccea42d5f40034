"""Training entry points: vanilla, perturbation, invariance, sequential, joint."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from robustlab.commands import SubParsers, flag, optional
from robustlab.config import (
    AttackConfig,
    DataConfig,
    EvalConfig,
    MixConfig,
    RunConfig,
    TrainConfig,
    default_step_size,
)
from robustlab.data.pools import LABEL_SOURCES, TRAIN_POOL_SETS
from robustlab.errors import ConfigError
from robustlab.regimes import ORDERS, Regime, check_eps_warmup, make_regime


def _shared(p: argparse.ArgumentParser, epochs: int) -> None:
    g = p.add_argument_group("shared training parameters")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train-size", type=int, default=0, help="0 = all 55,000 training images")
    g.add_argument(
        "--eval-size", type=int, default=0, help="0 = whole test set minus excluded sources"
    )
    g.add_argument(
        "--data-dir",
        type=optional,
        default=None,
        help="folder with mnist.npz (default $ROBUSTLAB_DATA_DIR, then Keras)",
    )
    g.add_argument(
        "--init-model",
        type=optional,
        default=None,
        help="model URI to start from (runs:/…/model, models:/…)",
    )
    g.add_argument(
        "--resume-run-id",
        type=optional,
        default=None,
        help="continue from this run's last checkpoint",
    )
    g.add_argument("--model", default="madry_cnn")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--learning-rate", type=float, default=1e-3)
    g.add_argument(
        "--lr-schedule",
        default="constant",
        help="constant; step: x0.1 from 75%% of each phase's epochs, x0.01 from 90%%; or cosine "
        "(from the rate down towards 0 over the phase's epochs)",
    )
    g.add_argument("--optimizer", default="adam", help="adam, or sgd (momentum 0.9)")
    g.add_argument(
        "--patience", type=int, default=3, help="early stopping patience in epochs (0 = off)"
    )
    g.add_argument(
        "--autoattack-size",
        type=int,
        default=200,
        help="final evaluation: AutoAttack/Square subset (0 = skip)",
    )
    g.add_argument(
        "--pgd-restarts",
        type=int,
        default=0,
        help="restarts of PGD-100 after PGD-40 (default 0: PGD-40 and AutoAttack; evaluate: 5)",
    )
    g.add_argument(
        "--robust-eval", type=flag, default=True, help="run the robustness evaluation at the end"
    )
    g.add_argument(
        "--all-curves",
        type=flag,
        default=None,
        help="log val/pgd_acc and val/inv_acc every epoch whatever the regime trains on",
    )
    g.add_argument("--run-name", type=optional, default=None)
    g.add_argument(
        "--auto-resume",
        type=flag,
        nargs="?",
        const=True,
        default=False,
        help="resume the newest unfinished run of this --run-name (tag robustlab.run_key) from "
        "its last checkpoint, or start it when there is none; refused once it finished",
    )
    g.add_argument(
        "--deterministic",
        type=flag,
        default=True,
        help="TensorFlow op determinism (false: a few %% faster, still seeded; see README)",
    )
    g.add_argument(
        "--precision",
        default="auto",
        help="training precision: auto (mixed_bfloat16 where the CPU has AVX512-BF16 or AMX, "
        "else float32), float32 or mixed_bfloat16; evaluation and the logged model are float32",
    )
    g.add_argument(
        "--allow-unknown-provenance",
        type=flag,
        nargs="?",
        const=True,
        default=False,
        help="accept an --init-model whose excluded test images are unknown (tagged on the run)",
    )


def _attack(p: argparse.ArgumentParser, steps: int = 7, step_size: float = 0.0) -> None:
    g = p.add_argument_group("perturbation attack")
    g.add_argument("--eps", type=float, default=0.3)
    g.add_argument("--attack-steps", type=int, default=steps)
    g.add_argument(
        "--step-size",
        type=float,
        default=step_size,
        help="0 = method default (pgd, trades: 2.5*eps/steps; fgsm_rs: 1.25*eps)",
    )
    g.add_argument("--random-start", type=flag, default=True)
    g.add_argument("--method", default="pgd", help="pgd | fgsm_rs | trades")
    g.add_argument(
        "--trades-beta",
        type=float,
        default=6.0,
        help="method=trades: weight of KL(f(x) || f(x')) beside CE(f(x), y) (0 = clean training)",
    )
    g.add_argument(
        "--eps-warmup",
        type=float,
        default=1.0,
        help="epochs over which eps ramps up from 0 (0 = none)",
    )


THESIS_SETS = ("thesis_linf_eps0.3", "thesis_linf_eps0.4")

# The end-of-training evaluation is lighter than `evaluate` (5,000 queries): on a robust model
# Square dominates its time (about 12 min per 1,000 images with 5,000 queries on 2 cores). It
# runs Square inside AutoAttack only; the stand-alone Square (`test/square_acc`, 44 s of a
# default `perturbation` run's 208 s evaluation) is left to `evaluate` and `register`.
END_OF_TRAINING_SQUARE_QUERIES = 1000


def add_parser(sub: SubParsers) -> list[str]:
    specs = {
        "vanilla": "clean training (no attack)",
        "perturbation": "Madry PGD / FGSM-RS adversarial training",
        "invariance": "clean + human-labelled invariance examples",
        "sequential": "one phase after the other: ptb_inv or inv_ptb",
        "joint": "clean + PGD + invariance examples in every batch",
    }
    for name, help_text in specs.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _shared(p, epochs={"vanilla": 6, "perturbation": 6}.get(name, 2))
        if name != "vanilla":
            _attack(p)
        if name in ("invariance", "sequential", "joint"):
            p.add_argument("--inv-label-source", choices=LABEL_SOURCES, default="human")
            p.add_argument(
                "--inv-pool",
                default=",".join(TRAIN_POOL_SETS),
                help="comma-separated invariance sets (names or label-store .json files) to train on",
            )
        if name in ("invariance", "sequential"):
            p.add_argument(
                "--mix-inv", type=float, default=0.25, help="share of invariance examples per batch"
            )
        if name == "sequential":
            p.add_argument("--order", default="ptb_inv", help=f"one of {ORDERS}")
            p.add_argument("--ptb-epochs", type=int, default=2)
            p.add_argument("--inv-epochs", type=int, default=2)
        if name == "joint":
            p.add_argument("--mix-clean", type=float, default=0.4)
            p.add_argument("--mix-ptb", type=float, default=0.4)
            p.add_argument("--mix-inv", type=float, default=0.2)
        p.set_defaults(func=run, regime=name)
    return list(specs)


def attack_config(args: argparse.Namespace) -> AttackConfig:
    """The attack parameters, with the method's default step size when --step-size is 0."""
    if not hasattr(args, "eps"):
        return AttackConfig()
    step = args.step_size or default_step_size(args.method, args.eps, args.attack_steps)
    return AttackConfig(
        eps=args.eps,
        steps=args.attack_steps,
        step_size=step,
        random_start=args.random_start is not False,
        method=args.method,
        eps_warmup=args.eps_warmup,
        trades_beta=args.trades_beta,
    )


def configs(args: argparse.Namespace) -> tuple[RunConfig, EvalConfig]:
    attack = attack_config(args)
    mix = (
        MixConfig(args.mix_clean, args.mix_ptb, args.mix_inv)
        if args.regime == "joint"
        else MixConfig()
    )
    cfg = RunConfig(
        data=DataConfig(args.data_dir, args.train_size, args.eval_size),
        train=TrainConfig(
            args.epochs,
            args.batch_size,
            args.learning_rate,
            args.seed,
            args.patience,
            args.model,
            args.init_model,
            args.resume_run_id,
            deterministic=args.deterministic is not False,
            precision=args.precision,
            lr_schedule=args.lr_schedule,
            optimizer=args.optimizer,
        ),
        mix=mix,
        attack=attack,
    ).validate(check_model=False)  # run() checks the model name last: it imports Keras
    ev = EvalConfig(
        eps=attack.eps,
        eval_size=args.eval_size,
        autoattack_size=args.autoattack_size,
        pgd_restarts=args.pgd_restarts,
        seed=args.seed,
        square_queries=END_OF_TRAINING_SQUARE_QUERIES,
        square_alone=False,
    ).validate()
    return cfg, ev


def check_inv_pool(specs: tuple[str, ...]) -> None:
    """Every --inv-pool entry names a known set or an existing label-store file."""
    from robustlab.data.invariance import TRAMER_SETS

    known = sorted({*TRAIN_POOL_SETS, *THESIS_SETS, *TRAMER_SETS})
    if not specs:
        raise ConfigError(f"--inv-pool is empty; name at least one of {known} or a .json store")
    for spec in specs:
        if spec.endswith(".json"):
            if not Path(spec).expanduser().is_file():
                raise ConfigError(
                    f"--inv-pool {spec}: no such label store; create it with "
                    "`robustlab label --store FILE --init-from candidates.npz`"
                )
        elif spec not in known:
            raise ConfigError(
                f"--inv-pool: unknown invariance set {spec!r}; choose from {known} "
                "or a label-store .json file"
            )


def run(args: argparse.Namespace) -> None:
    # Everything that can be checked is checked before TensorFlow is imported and before a run
    # exists: a rejected call leaves no run behind.
    from robustlab.data.mnist import resolve_mnist_path
    from robustlab.tracking import check_model_uri, configure_tracking

    cfg, ev = configs(args)
    regime = make_regime(
        args.regime,
        epochs=args.epochs,
        mix=cfg.mix,
        mix_inv=getattr(args, "mix_inv", 0.25),
        order=getattr(args, "order", "ptb_inv"),
        ptb_epochs=getattr(args, "ptb_epochs", 0),
        inv_epochs=getattr(args, "inv_epochs", 0),
    )
    if regime.uses_ptb:
        check_eps_warmup(regime, cfg.attack.eps_warmup)
    inv_pool = tuple(
        t.strip()
        for t in getattr(args, "inv_pool", ",".join(TRAIN_POOL_SETS)).split(",")
        if t.strip()
    )
    if regime.uses_inv or args.all_curves:
        check_inv_pool(inv_pool)
    resolve_mnist_path(args.data_dir)
    configure_tracking()
    if cfg.train.init_model:
        check_model_uri(cfg.train.init_model, "--init-model")
    with contextlib.ExitStack() as held:  # --auto-resume's lock, until the run has ended
        tags = {}
        if args.auto_resume:
            cfg, tags = _auto_resume(cfg, args.run_name, regime.name, held)
        if cfg.train.resume_run_id:
            from robustlab.train.resume import resumable_run

            resumable_run(cfg.train.resume_run_id, regime.name)  # params, checkpoint: the runner
        cfg.validate()  # now with the model name (imports Keras)
        _train(args, regime, cfg, ev, inv_pool, tags)


def _train(
    args: argparse.Namespace,
    regime: Regime,
    cfg: RunConfig,
    ev: EvalConfig,
    inv_pool: tuple[str, ...],
    tags: dict[str, str],
) -> None:
    """The training run and its one-line result."""
    from robustlab.train.runner import Extras, InvData, Judging, Placement, Watch, run_training

    extras = Extras(
        inv=InvData(label_source=getattr(args, "inv_label_source", "human"), pool=inv_pool),
        run=Placement(run_name=args.run_name, tags=tags),
        watch=Watch(all_curves=args.all_curves),
        judge=Judging(
            robust_eval=args.robust_eval is not False,
            allow_unknown_provenance=bool(args.allow_unknown_provenance),
        ),
    )
    run_id = run_training(regime, cfg, ev, extras)
    import mlflow

    from robustlab.tracking import ui_link

    exp = mlflow.tracking.MlflowClient().get_run(run_id).info.experiment_id
    print(
        f"run {run_id} finished; model at runs:/{run_id}/model; in the MLflow UI: "
        f"{ui_link(exp, run_id)}",
        file=sys.stderr,
    )


def _auto_resume(
    cfg: RunConfig, run_name: str | None, regime: str, held: contextlib.ExitStack
) -> tuple[RunConfig, dict]:
    """--auto-resume: `cfg` resuming the unfinished run of `run_name` (when there is one) and
    the tag that finds the run again, with this host's lock on `run_name` entered into `held`;
    one-line errors before any run exists."""
    from dataclasses import replace

    from robustlab.train.resume import RUN_KEY_TAG, run_key_held, unfinished_run

    if not run_name:
        raise ConfigError("--auto-resume needs --run-name: the name its runs are found by")
    if "'" in run_name:
        raise ConfigError(f"--run-name {run_name!r}: no quotes with --auto-resume")
    if cfg.train.resume_run_id:
        raise ConfigError("pass --auto-resume or --resume-run-id, not both")
    held.enter_context(run_key_held(run_name))
    found = unfinished_run(run_name, regime)
    if found:
        print(f"auto-resume: continuing run {found} ({run_name})", file=sys.stderr)
        cfg = replace(cfg, train=replace(cfg.train, resume_run_id=found))
    return cfg, {RUN_KEY_TAG: run_name}
