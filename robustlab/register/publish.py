"""Register the chosen model once, move the `champion` alias, and record its test evaluation.

Order (nothing half-written): every check first (champion comparison, provenance); then the
strong test evaluation in its own MLflow run; only when it finished is the version created with
all its tags in one call and the alias set. A source run that already has a version is never
registered again: its version is reused (and not re-evaluated).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from robustlab.config import EvalConfig
from robustlab.errors import ConfigError
from robustlab.evaluation.selection import RULE, Candidate
from robustlab.provenance import VERSION_EXCLUDED_TAG, encode_indices, model_info

ALIAS = "champion"
DEFAULT_NAME = "robustlab-mnist"
CRITERION_TAG = "robustlab.criterion"
SOURCE_TAG = "robustlab.source_run_id"


@dataclass(frozen=True)
class Outcome:
    version: str
    created: bool  # False: the source run already had this version
    champion: bool  # the alias points at it now
    test_run_id: str | None


def current_champion(client: MlflowClient, name: str):
    """The version `champion` points at, or None (no such model or alias)."""
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except Exception:  # noqa: BLE001 - no registered model / no alias
        return None


def _version_key(mv) -> tuple[float, float] | None:
    try:
        return (float(mv.tags[CRITERION_TAG]), float(mv.tags["robustlab.sel/clean_acc"]))
    except (KeyError, ValueError):
        return None


def existing_version(client: MlflowClient, name: str, run_id: str):
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except Exception:  # noqa: BLE001 - no such registered model yet
        return None
    return min(found, key=lambda mv: int(mv.version)) if found else None


def check_champion(
    client: MlflowClient, name: str, cand: Candidate, force: bool, clean_floor: float
) -> None:
    """Refuse (one line) to move `champion` to a model worse on the criterion, unless `force`."""
    champ = current_champion(client, name)
    if champ is None or force or champ.run_id == cand.run_id:
        return
    key = _version_key(champ)
    if key is None:
        raise ConfigError(
            f"{name}@{ALIAS} (version {champ.version}) records no selection criterion, so it "
            "cannot be compared; pass force=true to move the alias"
        )
    ours = cand.key(clean_floor)
    if ours < key:
        raise ConfigError(
            f"{name}@{ALIAS} (version {champ.version}, criterion {key[0]:.4f}, clean {key[1]:.4f}) "
            f"is better than run {cand.run_id} (criterion {ours[0]:.4f}, clean "
            f"{ours[1]:.4f}); nothing registered; pass force=true to move the alias anyway"
        )


def version_tags(
    cand: Candidate, excluded: np.ndarray, digest: str, eps: float, clean_floor: float
) -> dict[str, str]:
    tags = {f"robustlab.{k}": f"{v:.6g}" for k, v in cand.metrics.items()}
    tags.update({f"robustlab.{k}": v for k, v in cand.params.items()})
    tags.update(
        {
            CRITERION_TAG: f"{cand.score(clean_floor):.6g}",
            "robustlab.criterion_rule": RULE,
            "robustlab.clean_floor": f"{clean_floor:g}",
            "robustlab.study": cand.study,
            "robustlab.trial": cand.trial,
            "robustlab.data_digest": digest,
            "robustlab.eval_eps": f"{eps:g}",
            SOURCE_TAG: cand.run_id,
            VERSION_EXCLUDED_TAG: encode_indices(excluded),
            "robustlab.n_excluded": str(len(excluded)),
        }
    )
    return {k: v for k, v in tags.items() if v != ""}


def test_evaluation(
    model, cand: Candidate, excluded: np.ndarray, cfg: EvalConfig, data_dir: str | None, name: str
) -> tuple[str, dict[str, float], str]:
    """The strong test evaluation in its own run: (run id, metrics, MNIST digest).

    Full test set minus `excluded`, PGD-40 and PGD-100 x restarts, AutoAttack and Square
    (`evaluate_and_log`), plus plain and balanced invariance accuracy on Tramèr's test half.
    """
    from robustlab.data.mnist import load_mnist, subsample
    from robustlab.data.selection import test_half_sets
    from robustlab.evaluation.robustness import evaluate_and_log
    from robustlab.evaluation.validation import balanced_inv_accuracy, human_pool_accuracy
    from robustlab.provenance import log_excluded_sources
    from robustlab.tracking import start_run

    mnist = load_mnist(data_dir)
    test = subsample(mnist.test.without_sources(excluded), cfg.eval_size, seed=cfg.seed)
    if len(test) == 0:
        raise ConfigError("no test images left after removing the excluded sources")
    params = {
        "model_uri": cand.model_uri,
        "registered_model": name,
        "eps": cfg.eps,
        "eval_size": cfg.eval_size,
        "autoattack_size": cfg.autoattack_size,
        "pgd_restarts": cfg.pgd_restarts,
        "n_excluded_sources": len(excluded),
        "n_eval": len(test),
        "data_digest": mnist.digest,
    }
    tags = {
        "robustlab.model_uri": cand.model_uri,
        "robustlab.register": name,
        SOURCE_TAG: cand.run_id,
    }
    with start_run("register-evaluation", params=params, tags=tags) as run:
        log_excluded_sources(excluded)
        with tempfile.TemporaryDirectory(prefix="robustlab-register-") as tmp:
            metrics = evaluate_and_log(model, test, cfg, out_dir=Path(tmp), log=True)
        inv = balanced_inv_accuracy(model, test_half_sets(data_dir, excluded), "test")
        inv.update(human_pool_accuracy(model, excluded, data_dir))
        mlflow.log_metrics(inv)
    return run.info.run_id, {**metrics, **inv}, mnist.digest


def publish(
    cand: Candidate,
    *,
    name: str,
    force: bool,
    excluded: np.ndarray,
    cfg: EvalConfig,
    data_dir: str | None,
    clean_floor: float,
) -> Outcome:
    """Register `cand` (once) under `name`, evaluate it on test data, point `champion` at it."""
    from robustlab.tracking import load_keras_model

    client = MlflowClient()
    check_champion(client, name, cand, force, clean_floor)
    found = existing_version(client, name, cand.run_id)
    if found is not None:
        client.set_registered_model_alias(name, ALIAS, found.version)
        print(
            f"register: run {cand.run_id} is already {name} version {found.version}; "
            f"{name}@{ALIAS} -> {found.version} (no new version)",
            file=sys.stderr,
        )
        return Outcome(found.version, False, True, found.tags.get("robustlab.test_run_id"))
    model = load_keras_model(cand.model_uri)
    test_run_id, metrics, digest = test_evaluation(model, cand, excluded, cfg, data_dir, name)
    tags = version_tags(cand, excluded, digest, cfg.eps, clean_floor)
    tags["robustlab.test_run_id"] = test_run_id
    tags.update({f"robustlab.{k}": f"{v:.6g}" for k, v in metrics.items()})
    info = model_info(cand.model_uri)
    source = f"models:/{info.model_id}" if info.model_id else cand.model_uri
    if not client.search_registered_models(filter_string=f"name='{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(
        name, source, run_id=cand.run_id, tags=tags, model_id=info.model_id
    )
    client.set_registered_model_alias(name, ALIAS, mv.version)
    print(
        f"register: {name} version {mv.version} <- run {cand.run_id} "
        f"(criterion {cand.score(clean_floor):.4f}); {name}@{ALIAS} -> {mv.version}; test run {test_run_id}",
        file=sys.stderr,
    )
    return Outcome(mv.version, True, True, test_run_id)
