"""Where `register` finds its candidates: an Optuna study, an experiment parent run, or one model.

A study's trials already carry their selection metrics (sel/* on their MLflow runs, computed by
`tune` on validation data only). An experiment's children carry none: their selection metrics are
computed here, exactly as `tune` defines them (`selection_metrics`), so both paths apply one
criterion to the same numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient

from robustlab.errors import ConfigError, RobustlabError
from robustlab.register.criterion import SEL_METRICS, Candidate

OPTUNA_STORAGE_ENV = "ROBUSTLAB_OPTUNA_STORAGE"


def default_storage() -> str:
    """$ROBUSTLAB_OPTUNA_STORAGE, else the SQLite file tracking/optuna.db."""
    from robustlab.tracking import tracking_dir

    return os.environ.get(OPTUNA_STORAGE_ENV) or f"sqlite:///{tracking_dir() / 'optuna.db'}"


def _mix(params: dict[str, str]) -> dict[str, str]:
    return {k: params[k] for k in ("mix_clean", "mix_ptb", "mix_inv", "eps") if k in params}


def load_study(study_name: str, storage: str | None):
    """The Optuna study, refusing a missing SQLite file or unknown name in one line (creates nothing)."""
    import optuna

    url = storage or default_storage()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"no Optuna storage at {url}; run `robustlab tune` first or pass the study's storage"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=url)
    except KeyError:
        raise ConfigError(
            f"unknown study {study_name!r} in {url}; check study_name (and storage)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - storage errors come in many types
        raise ConfigError(
            f"cannot open Optuna storage {url} ({type(exc).__name__}); check storage"
        ) from None


def from_study(study) -> tuple[list[Candidate], float]:
    """Candidates of a study's COMPLETE trials (their MLflow runs' sel/* metrics) and its clean floor."""
    from optuna.trial import TrialState

    if "clean_floor" not in study.user_attrs:
        raise ConfigError(f"study {study.study_name!r} records no clean_floor; is it a tune study?")
    client = MlflowClient()
    out = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        run = client.get_run(run_id)
        if not all(
            m in run.data.metrics for m in ("sel/clean_acc", "sel/pgd_acc", "sel/inv_bal_acc")
        ):
            continue
        out.append(
            Candidate(
                run_id=run_id,
                model_uri=f"runs:/{run_id}/model",
                metrics={m: run.data.metrics[m] for m in SEL_METRICS if m in run.data.metrics},
                study=study.study_name,
                trial=str(trial.number),
                params=_mix(run.data.params),
            )
        )
    return out, float(study.user_attrs["clean_floor"])


def selection_metrics(model, data_dir: str | None, eps: float) -> dict[str, float]:
    """sel/* of a model on validation data only, computed as `tune` computes them: clean accuracy
    on the validation split, PGD-10 at `eps` on its seeded 500-image subset, plain and balanced
    invariance accuracy on the selection set (thesis validation pool + Tramèr selection half)."""
    from robustlab.config import AttackConfig, RunConfig
    from robustlab.data.mnist import load_mnist, subsample
    from robustlab.invariance.selection import balanced_inv_accuracy, selection_sets
    from robustlab.train.inv_pool import load_inv_pools
    from robustlab.train.loop import clean_validation
    from robustlab.train.runner import VAL_ATTACK_SIZE, _pgd_validation

    mnist = load_mnist(data_dir)
    val = subsample(mnist.val, VAL_ATTACK_SIZE, seed=0)
    pgd = _pgd_validation(val.x, val.y, RunConfig(attack=AttackConfig(eps=eps)))(model)
    return {
        "sel/clean_acc": clean_validation(mnist.val)(model)["val/clean_acc"],
        "sel/pgd_acc": pgd["val/pgd_acc"],
        **balanced_inv_accuracy(model, selection_sets(data_dir, load_inv_pools(data_dir)), "sel"),
    }


def from_models(
    runs: list[tuple[str, str, dict[str, str]]], data_dir: str | None, eps: float
) -> list[Candidate]:
    """Candidates for (run_id, model_uri, params) triples, scored by `selection_metrics`."""
    from robustlab.tracking import load_keras_model

    out = []
    for run_id, uri, params in runs:
        metrics = selection_metrics(load_keras_model(uri), data_dir, eps)
        out.append(Candidate(run_id=run_id, model_uri=uri, metrics=metrics, params=_mix(params)))
    return out


def experiment_children(parent_run_id: str) -> list[tuple[str, str, dict[str, str]]]:
    """(run_id, runs:/<id>/model, params) of a parent run's FINISHED children that logged a model."""
    client = MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except Exception:  # noqa: BLE001
        raise ConfigError(
            f"experiment_run_id={parent_run_id}: no such run in {client.tracking_uri}"
        ) from None
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'",
    )
    return [
        (r.info.run_id, f"runs:/{r.info.run_id}/model", dict(r.data.params))
        for r in children
        if (r.outputs and r.outputs.model_outputs)  # a LoggedModel, or (older runs) artifacts
        or client.list_artifacts(r.info.run_id, "model")
    ]


def model_run(model_uri: str) -> tuple[str, str, dict[str, str]]:
    """(run_id, model_uri, params) for one model URI; unknown URIs are one line."""
    from robustlab.provenance import model_info

    info = model_info(model_uri)
    if not info.run_id:
        raise RobustlabError(f"{model_uri} was not logged by a run; register a robustlab model")
    return info.run_id, model_uri, dict(MlflowClient().get_run(info.run_id).data.params)
