"""`robustlab register`: register the best robust model and point the `champion` alias at it.

Candidates come from an Optuna study (--study-name, its COMPLETE trials' MLflow runs and their
sel/* metrics), from an experiment parent run (--experiment-run-id, its finished children, whose
selection metrics are computed here on validation data) or from one model (--model-uri, or
--run-name NAME: the finished run of `--run-name NAME --auto-resume`, e.g. the champion).
Criterion (validation data only): among candidates with sel/clean_acc >= the clean floor (the
study's, else --clean-floor), the highest min(sel/pgd_acc, sel/inv_bal_acc), ties broken by
sel/clean_acc. The chosen model is registered once (a source run that already has a version
reuses it), tagged with its selection metrics, mixture, eps, study/trial, data digest, source
run and excluded test images, evaluated on the test set minus every image used as a source for
its training or selection (PGD-40, PGD-100 x restarts, AutoAttack, Square, balanced invariance
accuracy on Tramèr's test half) in its own MLflow run, and those results are tagged on the
version. `champion` never moves to a model that is worse on the criterion unless --force.

Shipped models: `--model-uri URI --export pretrained/<name>` (or `--run-name NAME --export …`)
writes the model as a small MLflow model folder (float32 weights, their SHA-256, exclusions,
source run, data digest) with its card CARD.md (the card of the version registered from it,
when there is one) and registers nothing; `--from pretrained/<name>` registers such a folder as
<name>@champion with its card (see `robustlab.register.pretrained`).
"""

from __future__ import annotations

import argparse

import numpy as np

from robustlab.commands import SubParsers, flag, optional
from robustlab.commands.eval_args import add_eval_arguments, eval_config
from robustlab.credentials import refuse_password_argument
from robustlab.errors import ConfigError

DEFAULT_CLEAN_FLOOR = 0.95  # experiment runs and single models (a study records its own floor)


def add_parser(sub: SubParsers) -> list[str]:
    p = sub.add_parser(
        "register",
        help="register the best robust model (validation criterion) as <name>@champion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--study-name", type=optional, default=None, help="Optuna study of `tune`")
    p.add_argument(
        "--storage",
        type=optional,
        default=None,
        help="the study's storage (default $ROBUSTLAB_OPTUNA_STORAGE, then tracking/optuna.db)",
    )
    p.add_argument("--experiment-run-id", type=optional, default=None, help="experiment parent run")
    p.add_argument("--model-uri", type=optional, default=None, help="one model to register")
    p.add_argument(
        "--run-name",
        type=optional,
        default=None,
        help="the model of the finished run trained with --run-name NAME --auto-resume (e.g. "
        "champion), as --model-uri; refused while that run has not finished",
    )
    p.add_argument(
        "--export",
        type=optional,
        default=None,
        metavar="DIR",
        help="with --model-uri or --run-name: write it to DIR (e.g. pretrained/<name>) as a "
        "shipped model folder with CARD.md (at most 4 MB); nothing is registered",
    )
    p.add_argument(
        "--from",
        dest="from_dir",
        type=optional,
        default=None,
        metavar="DIR",
        help="register a shipped model folder (pretrained/<name>) as <name>@champion with its card",
    )
    p.add_argument("--name", default="robustlab-mnist", help="registered model name")
    p.add_argument(
        "--force", type=flag, nargs="?", const=True, default=False, help="move champion anyway"
    )
    p.add_argument(
        "--clean-floor",
        type=lambda t: float(t) if t.strip() else None,
        default=None,
        help=f"minimum sel/clean_acc (default: the study's; else {DEFAULT_CLEAN_FLOOR})",
    )
    add_eval_arguments(p)
    p.add_argument("--data-dir", type=optional, default=None)
    p.set_defaults(func=run)
    return ["register"]


def _check_args(args: argparse.Namespace) -> None:
    sources = (
        args.study_name,
        args.experiment_run_id,
        args.model_uri,
        args.run_name,
        args.from_dir,
    )
    given = [x for x in sources if x]
    if len(given) != 1:
        raise ConfigError(
            "pass exactly one of study_name, experiment_run_id, model_uri, run_name or from "
            f"(got {len(given)})"
        )
    if args.export and not (args.model_uri or args.run_name):
        raise ConfigError(
            "--export writes the model --model-uri or --run-name names; pass one of them"
        )
    if not args.name or not args.name.strip():
        raise ConfigError("name is empty; pass a registered model name, e.g. robustlab-mnist")
    if args.clean_floor is not None and not 0.0 <= args.clean_floor <= 1.0:
        raise ConfigError(f"clean_floor must lie in [0, 1], got {args.clean_floor}")


def selection_sources(data_dir: str | None) -> np.ndarray:
    """MNIST test images used for model selection (the selection set's sources): Tramèr's
    selection half and the thesis pool's sources. A registered model is never scored on them."""
    from robustlab.data.pools import load_inv_pools
    from robustlab.data.tramer_halves import selection_sources as sources

    return sources(data_dir, load_inv_pools(data_dir))


def run(args: argparse.Namespace):
    _check_args(args)
    refuse_password_argument(args.storage)
    if args.run_name:
        from robustlab.train.resume import finished_run

        args.model_uri = f"runs:/{finished_run(args.run_name)}/model"
    if args.export or args.from_dir:
        return _shipped(args)
    cfg = eval_config(args)
    from robustlab.evaluation.selection import choose
    from robustlab.provenance import require_provenance
    from robustlab.register import candidates as cands
    from robustlab.register.publish import check_champion, publish
    from robustlab.tracking import configure_tracking

    configure_tracking()
    if args.study_name:
        study = cands.load_study(args.study_name, args.storage)
        found, floor = cands.from_study(study)
        source = f"study {args.study_name!r}"
        if args.clean_floor is not None:
            floor = args.clean_floor
    else:
        floor = DEFAULT_CLEAN_FLOOR if args.clean_floor is None else args.clean_floor
        if args.experiment_run_id:
            runs = cands.experiment_children(args.experiment_run_id)
            source = f"experiment run {args.experiment_run_id}"
        else:
            runs = [cands.model_run(args.model_uri)]
            source = args.model_uri
        for _, uri, _ in runs:  # fail closed before any expensive scoring
            require_provenance(uri, False, None)
        found = cands.from_models(runs, args.data_dir, args.eps, floor) if runs else []
    best = choose(found, floor, source)
    from mlflow.tracking import MlflowClient

    check_champion(MlflowClient(), args.name, best, bool(args.force), floor)
    prov = require_provenance(best.model_uri, False, None)
    excluded = np.union1d(prov.excluded, selection_sources(args.data_dir)).astype(np.int64)
    return publish(
        best,
        name=args.name,
        force=bool(args.force),
        excluded=excluded,
        cfg=cfg,
        data_dir=args.data_dir,
        clean_floor=floor,
    )


def _shipped(args: argparse.Namespace):
    """--export (write a shipped model folder) or --from (register one)."""
    from pathlib import Path

    from robustlab.register import pretrained
    from robustlab.tracking import check_model_uri, configure_tracking

    configure_tracking()
    if args.export:
        check_model_uri(args.model_uri, "--model-uri")
        return pretrained.export(args.model_uri, Path(args.export), args.data_dir, args.name)
    return pretrained.register_from(Path(args.from_dir), args.name, bool(args.force))
