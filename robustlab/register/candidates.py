"""Where `register` finds its candidates: an Optuna study, an experiment parent run, or one model.

A study's trials already carry their selection metrics (sel/* on their MLflow runs, computed by
`tune` on validation data only). An experiment's children carry none: their selection metrics are
computed here on the same validation data (`robustlab.evaluation.selection.SelectionData`), so both
paths apply one rule to the same numbers.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from robustlab.errors import ConfigError, RobustlabError
from robustlab.evaluation.selection import SEL_METRICS, Candidate, SelectionData
from robustlab.launch.launcher import RUN_ATTR, finished_children
from robustlab.launch.storage import load_existing, open_storage, redact_url, storage_url


def _mix(params: dict[str, str]) -> dict[str, str]:
    return {k: params[k] for k in ("mix_clean", "mix_ptb", "mix_inv", "eps") if k in params}


def load_study(study_name: str, storage: str | None):
    """The tune study, refusing a missing SQLite file or unknown name in one line (creates
    nothing: a SQLite URL naming no file is refused before it is opened)."""
    url = storage_url(storage)
    shown = redact_url(url)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"no Optuna storage at {shown}; run `robustlab tune` first or pass the study's storage"
        )
    study = load_existing(open_storage(url), study_name)
    if study is None:
        raise ConfigError(
            f"unknown study {study_name!r} in {shown}; check study_name (and storage)"
        )
    return study


def from_study(study) -> tuple[list[Candidate], float]:
    """Candidates of a study's COMPLETE trials (their MLflow runs' sel/* metrics) and its clean floor."""
    from optuna.trial import TrialState

    if "clean_floor" not in study.user_attrs:
        raise ConfigError(f"study {study.study_name!r} records no clean_floor; is it a tune study?")
    client = MlflowClient()
    out = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = trial.user_attrs.get(RUN_ATTR)
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


def from_models(
    runs: list[tuple[str, str, dict[str, str]]],
    data_dir: str | None,
    eps: float,
    clean_floor: float,
) -> list[Candidate]:
    """Candidates for (run_id, model_uri, params) triples, scored on `SelectionData`."""
    from robustlab.tracking import load_keras_model

    data = SelectionData(data_dir, eps)
    out = []
    for run_id, uri, params in runs:
        metrics = data.metrics(load_keras_model(uri), clean_floor)
        out.append(Candidate(run_id=run_id, model_uri=uri, metrics=metrics, params=_mix(params)))
    return out


def experiment_children(parent_run_id: str) -> list[tuple[str, str, dict[str, str]]]:
    """(run_id, runs:/<id>/model, params) of a parent run's FINISHED children that logged a model."""
    client = MlflowClient()
    _, children = finished_children(parent_run_id, "experiment_run_id")
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
