"""Register the chosen model once, move the `champion` alias, and record its test evaluation.

Order (nothing half-written): every check first (champion comparison, provenance); then the
strong test evaluation in its own MLflow run; only when it finished is the version created with
all its tags in one call and the alias set. A source run that already has a version is never
registered again: its version is reused (and not re-evaluated).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from robustlab.config import EvalConfig
from robustlab.errors import ConfigError
from robustlab.evaluation.selection import RULE, Candidate
from robustlab.provenance import VERSION_EXCLUDED_TAG, decode_indices, encode_indices, model_info

ALIAS = "champion"
CROWN_SETTLE_S = 1.0  # a concurrent register's alias move shows within this pause
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


def has_provenance(mv) -> bool:
    """Whether a version was registered by robustlab: its exclusions and its test evaluation."""
    return VERSION_EXCLUDED_TAG in mv.tags and "robustlab.test_run_id" in mv.tags


def existing_version(client: MlflowClient, name: str, run_id: str):
    """The first version of `name` from `run_id` that carries robustlab's provenance and test
    evaluation (a version made another way, e.g. by a plain `mlflow.register_model`, is never
    reused: register makes a new one)."""
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except Exception:  # noqa: BLE001 - no such registered model yet
        return None
    for mv in sorted(found, key=lambda mv: int(mv.version)):
        if has_provenance(client.get_model_version(name, mv.version)):
            return mv
        print(
            f"register: {name} version {mv.version} (run {run_id}) has no robustlab provenance "
            "or test evaluation; registering a new version instead of reusing it",
            file=sys.stderr,
        )
    return None


def check_champion(
    client: MlflowClient,
    name: str,
    cand: Candidate,
    force: bool,
    clean_floor: float,
    *,
    outcome: str = "nothing registered",
) -> None:
    """Refuse (one line, saying `outcome`) to move `champion` to a model worse on the criterion,
    unless `force`."""
    champ = current_champion(client, name)
    if champ is None or force or champ.run_id == cand.run_id:
        return
    key = _version_key(champ)
    if key is None:
        raise ConfigError(
            f"{name}@{ALIAS} (version {champ.version}) records no selection criterion, so it "
            f"cannot be compared; {outcome}; pass force=true to move the alias"
        )
    ours = cand.key(clean_floor)
    if ours < key:
        raise ConfigError(
            f"{name}@{ALIAS} (version {champ.version}, criterion {key[0]:.4f}, clean {key[1]:.4f}) "
            f"is better than run {cand.run_id} (criterion {ours[0]:.4f}, clean "
            f"{ours[1]:.4f}); {outcome}; pass force=true to move the alias anyway"
        )


def crown(
    client: MlflowClient, name: str, version: str, cand: Candidate, force: bool, floor: float
) -> None:
    """Point `champion` at `version`, the champion check repeated right before each move and
    the move checked after a pause: of concurrent registers, the better model ends champion
    (a worse one that moved the alias meanwhile is overtaken again). ConfigError when the
    current champion is better."""
    kept = f"version {version} stays registered, not {ALIAS}"
    for _ in range(5):
        check_champion(client, name, cand, force, floor, outcome=kept)
        client.set_registered_model_alias(name, ALIAS, version)
        time.sleep(CROWN_SETTLE_S)
        champ = current_champion(client, name)
        if champ is not None and champ.version == version:
            return


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
    from robustlab.data.tramer_halves import test_half_sets
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
        if not found.description:
            _write_card(client, name, found.version, found.tags, cand)
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
    _write_card(client, name, mv.version, tags, cand)
    try:
        crown(client, name, mv.version, cand, force, clean_floor)
    except ConfigError as exc:  # a concurrent register crowned a better model meanwhile
        print(
            f"register: {exc}",
            file=sys.stderr,
        )
        return Outcome(mv.version, True, False, test_run_id)
    print(
        f"register: {name} version {mv.version} <- run {cand.run_id} "
        f"(criterion {cand.score(clean_floor):.4f}); {name}@{ALIAS} -> {mv.version}; test run {test_run_id}",
        file=sys.stderr,
    )
    return Outcome(mv.version, True, True, test_run_id)


def _write_card(client: MlflowClient, name: str, version: str, tags: dict, cand: Candidate) -> None:
    """The version's description: its model card (robustlab.register.card)."""
    from robustlab.provenance import METADATA_KEY
    from robustlab.register.card import model_card

    meta = (model_info(cand.model_uri).metadata or {}).get(METADATA_KEY, {})
    params = client.get_run(cand.run_id).data.params
    n_excluded = len(decode_indices(tags.get(VERSION_EXCLUDED_TAG, "")))
    card = model_card(name, str(version), tags, params, meta, n_excluded)
    client.update_model_version(name, version, description=card)


def registered_version(model_uri: str):
    """The registered version a `models:/<name>/<version|latest|stage>` or `@alias` URI names,
    or None (a run, logged-model id or path names no version)."""
    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or rest.startswith("m-"):
        return None
    client = MlflowClient()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, ref = rest.partition("/")
        if ref.isdigit():
            return client.get_model_version(name, ref)
        versions = client.search_model_versions(f"name='{name}'")
        if ref.lower() != "latest":
            versions = [v for v in versions if (v.current_stage or "").lower() == ref.lower()]
        return max(versions, key=lambda v: int(v.version)) if versions else None
    except Exception:  # noqa: BLE001 - an unknown name or reference: nothing to record on
        return None


def record_evaluation(model_uri: str, run_id: str, metrics: dict[str, float]) -> str | None:
    """Tag a later evaluation on the registered version `model_uri` names and add it to the
    version's model card; the version, or None when the URI names none."""
    from robustlab.register.card import with_evaluation

    mv = registered_version(model_uri)
    if mv is None:
        return None
    client = MlflowClient()
    client.set_model_version_tag(mv.name, mv.version, "robustlab.last_evaluation_run_id", run_id)
    for key in ("test/clean_acc", "test/pgd40_acc", "test/autoattack_acc"):
        if key in metrics:
            client.set_model_version_tag(
                mv.name, mv.version, f"robustlab.last_evaluation.{key}", f"{metrics[key]:.6g}"
            )
    card = client.get_model_version(mv.name, mv.version).description or ""
    client.update_model_version(
        mv.name, mv.version, description=with_evaluation(card, run_id, model_uri, metrics)
    )
    return mv.version
