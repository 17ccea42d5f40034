"""Provenance that travels with a logged model: which MNIST test images it must never be scored on.

Every model robustlab logs carries, in its MLmodel `metadata["robustlab"]`, the MNIST test
indices that were sources of invariance examples it trained on or was selected on, with the run
id, regime, mixture, eps, seed, data digest and training precision. MLflow resolves that metadata
for every URI of a model (`runs:/<id>/model`, `models:/<name>/<version>`, `@<alias>`,
`/latest`, a stage name, `models:/m-…`, a local copy), so the exclusions survive registration. A
registered version may add exclusions of its own (the selection images `register` chose it on)
in the tag `robustlab.excluded_test_indices`: they are found from the model's run whatever URI
named it (`version_exclusions`), and a registry that cannot be searched fails the load.

Fail closed: a model whose exclusions cannot be read (logged outside robustlab, or trained from
a model of unknown provenance) is refused for evaluation and as `init_model`, unless the user
passes `--allow-unknown-provenance`, which the consuming run records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robustlab.errors import RobustlabError

EXCLUDED_ARTIFACT = "excluded_test_indices.json"  # a run's excluded MNIST test images
METADATA_KEY = "robustlab"
VERSION_EXCLUDED_TAG = "robustlab.excluded_test_indices"
UNKNOWN_TAG = "robustlab.provenance"  # "unknown-allowed" on runs that used such a model
SCHEMA = 1


@dataclass(frozen=True)
class Provenance:
    """What is known about where a model's training and selection data came from."""

    excluded: np.ndarray  # sorted MNIST test indices the model must not be evaluated on
    known: bool  # False: the exclusions are unknown or incomplete
    source: str  # "model metadata", "run artifact" or "unknown"
    run_id: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def model_metadata(
    *,
    run_id: str,
    regime: str,
    mix: dict[str, float],
    phases: list[dict[str, Any]],
    eps: float,
    seed: int,
    data_digest: str,
    excluded: Iterable[int],
    complete: bool = True,
    init_model: str | None = None,
    training_precision: str = "float32",
) -> dict[str, Any]:
    """The `metadata` dict a robustlab model is logged with (JSON/YAML-safe values only)."""
    return {
        METADATA_KEY: {
            "schema": SCHEMA,
            "run_id": run_id,
            "regime": regime,
            "mix": {k: float(v) for k, v in mix.items()},
            "phases": phases,
            "eps": float(eps),
            "seed": int(seed),
            "data_digest": data_digest,
            "precision": "float32",  # of the logged model, whatever it was trained in
            "training_precision": training_precision,
            "init_model": init_model or "",
            "excluded_complete": bool(complete),
            "excluded_test_indices": [int(i) for i in excluded],
        }
    }


def encode_indices(indices: Iterable[int]) -> str:
    """Comma-separated indices (a registry tag value; 10,000 indices fit its 100,000 characters)."""
    return ",".join(str(int(i)) for i in indices)


def decode_indices(text: str) -> np.ndarray:
    parts = [t for t in text.split(",") if t.strip()]
    return np.asarray([int(t) for t in parts], dtype=np.int64)


def _short(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def model_info(model_uri: str):
    """`mlflow.models.get_model_info`, with an unknown run, model, version or alias as one line."""
    from mlflow.models import get_model_info

    try:
        return get_model_info(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a bad URI
        raise RobustlabError(
            f"model {model_uri!r} not found ({_short(exc)}); check the run id, registered model "
            "name, version or alias (runs:/<run_id>/model, models:/<name>/<version>, models:/<name>@<alias>)"
        ) from None


def version_exclusions(run_id: str | None, model_id: str | None) -> np.ndarray:
    """The extra exclusions (VERSION_EXCLUDED_TAG) of every registered version of the model
    that `run_id` logged (narrowed to `model_id` when known), whatever URI names it: a version
    number, an alias, `latest`, a stage, the logged-model id or a local copy. Fails closed: a
    registry that cannot be searched raises RobustlabError (the model is not used)."""
    if not run_id:
        return np.empty(0, dtype=np.int64)
    from mlflow.tracking import MlflowClient

    try:
        versions = MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types
        raise RobustlabError(
            f"cannot search the Model Registry for the versions of run {run_id}'s model "
            f"({_short(exc)}); without them its excluded test images are unknown"
        ) from None
    parts = [
        decode_indices(mv.tags.get(VERSION_EXCLUDED_TAG, ""))
        for mv in versions
        if not model_id or not getattr(mv, "model_id", None) or mv.model_id == model_id
    ]
    return np.unique(np.concatenate([np.empty(0, np.int64), *parts])).astype(np.int64)


def _run_artifact_exclusions(run_id: str) -> np.ndarray | None:
    """Legacy: the `excluded_test_indices.json` the model's run recorded, if any."""
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=EXCLUDED_ARTIFACT)
    except Exception:  # noqa: BLE001 - no such artifact
        return None
    with open(path) as f:
        return np.asarray(json.load(f)["indices"], dtype=np.int64)


def read_provenance(model_uri: str) -> Provenance:
    """The model's provenance: its metadata, else its run's recorded exclusions, else unknown.

    Raises RobustlabError (one line) when the URI itself cannot be resolved.
    """
    info = model_info(model_uri)
    meta = (info.metadata or {}).get(METADATA_KEY)
    run_id = info.run_id or (meta.get("run_id") if isinstance(meta, dict) else None)
    extra = version_exclusions(run_id, getattr(info, "model_id", None))
    if isinstance(meta, dict) and "excluded_test_indices" in meta:
        excluded = np.union1d(np.asarray(meta["excluded_test_indices"], dtype=np.int64), extra)
        return Provenance(
            excluded.astype(np.int64),
            bool(meta.get("excluded_complete", False)),
            "model metadata",
            run_id,
            meta,
        )
    recorded = _run_artifact_exclusions(info.run_id) if info.run_id else None
    if recorded is not None:
        return Provenance(
            np.union1d(recorded, extra).astype(np.int64), True, "run artifact", info.run_id
        )
    return Provenance(extra, False, "unknown", info.run_id)


def require_provenance(model_uri: str, allow_unknown: bool, flag: str | None) -> Provenance:
    """`read_provenance`, refusing (one line) a model whose exclusions are unknown unless allowed.

    `flag` names the option that allows it (None: the command has none).
    """
    prov = read_provenance(model_uri)
    if not prov.known and not allow_unknown:
        why = (
            "was trained from a model of unknown provenance"
            if prov.source == "model metadata"
            else "carries no robustlab provenance"
        )
        fix = f", or pass {flag} to accept that (recorded on the run)" if flag else ""
        raise RobustlabError(
            f"{model_uri} {why}: the MNIST test images it trained or was selected on are unknown, "
            f"so evaluating it could leak; use a model logged by robustlab{fix}"
        )
    return prov


def metadata_for_run(
    regime,
    cfg,
    *,
    run_id: str,
    data_digest: str,
    excluded: Iterable[int],
    init_known: bool = True,
    training_precision: str = "float32",
) -> dict[str, Any]:
    """`model_metadata` for a `robustlab.regimes.Regime` trained under a `RunConfig`."""
    phases = [
        {
            "name": p.name,
            "epochs": int(p.epochs),
            **{f"mix_{k}": float(v) for k, v in vars(p.mix).items()},
        }
        for p in regime.phases
    ]
    return model_metadata(
        run_id=run_id,
        regime=regime.name,
        mix=dict(vars(regime.phases[-1].mix)),
        phases=phases,
        eps=cfg.attack.eps,
        seed=cfg.train.seed,
        data_digest=data_digest,
        excluded=excluded,
        complete=init_known,
        init_model=cfg.train.init_model,
        training_precision=training_precision,
    )


def log_excluded_sources(indices) -> None:
    """Record in the active run which MNIST test images its model must never be evaluated on."""
    import mlflow

    mlflow.log_dict(
        {"mnist_split": "test", "indices": [int(i) for i in indices]}, EXCLUDED_ARTIFACT
    )


def excluded_sources_of(model_uri: str, allow_unknown: bool = False) -> np.ndarray:
    """MNIST test indices excluded for the model at `model_uri`. Fails closed: raises
    RobustlabError when they cannot be read, unless `allow_unknown`."""
    return require_provenance(model_uri, allow_unknown, "--allow-unknown-provenance").excluded
