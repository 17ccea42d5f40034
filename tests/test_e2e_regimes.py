"""End to end through `mlflow run`: perturbation, chaining via init_model, sequential, joint, experiment."""

from __future__ import annotations

import csv
import io
import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from robustlab.data.pools import load_inv_pools
from robustlab.errors import ConfigError
from robustlab.experiment.report import CLEAN, INV, PGD, verdicts
from robustlab.experiment.run import run_experiment
from robustlab.tracking import ensure_experiment
from tests.conftest import DATA_DIR
from tests.test_e2e_vanilla import mlflow_run

pytestmark = pytest.mark.slow
TINY = [
    "train_size=512",
    "eval_size=150",
    "batch_size=64",
    "attack_steps=2",
    "autoattack_size=40",
    "pgd_restarts=1",
    f"data_dir={DATA_DIR}",
]


def _runs(name: str | None = None):
    runs = MlflowClient().search_runs(
        [ensure_experiment("robustlab")], order_by=["attributes.start_time ASC"]
    )
    return [r for r in runs if name is None or r.info.run_name == name]


def _json(run_id: str, path: str) -> dict:
    with open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)) as f:
        return json.load(f)


def test_invariance_then_perturbation_chained_by_init_model(tracking, tmp_path):
    ensure_experiment("robustlab")
    out = mlflow_run("invariance", tmp_path, "epochs=1", "robust_eval=false", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    [inv_run] = _runs()
    excluded = set(_json(inv_run.info.run_id, "excluded_test_indices.json")["indices"])
    pools = load_inv_pools(
        str(DATA_DIR)
    )  # the thesis pool (train + validation): test images 0..499
    assert excluded == {int(i) for s in pools.used_sets for i in s.source_index}
    assert len(excluded) == 493  # 500 minus the 7 rater ties the `drop` tie policy removes
    m = inv_run.data.metrics
    for key in (
        "val/inv_acc",
        "test/inv_acc/tramer_linf_eps0.3",
        "test/inv_acc_changed/tramer_linf_eps0.3",
        "test/inv_acc_kept/tramer_linf_eps0.3_ci_high",
        "test/inv_acc/tramer_l0",
    ):
        assert key in m, key

    out = mlflow_run(
        "perturbation",
        tmp_path,
        "epochs=1",
        "eps_warmup=0.5",
        f"init_model=runs:/{inv_run.info.run_id}/model",
        *TINY,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ptb_run = _runs()[-1]
    ptb_id = ptb_run.info.run_id
    m = ptb_run.data.metrics
    for key in (
        "test/clean_acc",
        "test/pgd40_acc",
        "test/pgd100x1_acc",
        "test/autoattack_acc",
    ):
        assert 0.0 <= m[key] <= 1.0 and m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
    assert "test/square_acc" not in m  # end of training: Square runs inside AutoAttack only
    assert m["test/pgd40_acc"] < m["test/clean_acc"]  # the attack breaks some examples
    assert [h.step for h in MlflowClient().get_metric_history(ptb_id, "val/pgd_acc")] == [0]
    # the chained model inherits the exclusions: no evaluated image is a source of a training example
    assert set(_json(ptb_id, "excluded_test_indices.json")["indices"]) == excluded
    evaluated = set(_json(ptb_id, "evaluated_test_indices.json")["indices"])
    assert len(evaluated) == 150 and not evaluated & excluded
    report = _json(ptb_id, "evaluation.json")
    assert report["eps"] == pytest.approx(0.3)
    artifacts = {a.path for a in MlflowClient().list_artifacts(ptb_id)}
    assert {
        "evaluation.json",
        "evaluation.md",
        "eps_curve.png",
        "adversarial_examples.png",
    } <= artifacts
    assert ptb_run.outputs.model_outputs  # the model is a LoggedModel of the run


def test_sequential_logs_one_nested_run_per_phase(tracking, tmp_path):
    ensure_experiment("robustlab")
    out = mlflow_run(
        "sequential",
        tmp_path,
        "order=inv_ptb",
        "ptb_epochs=1",
        "inv_epochs=2",
        "robust_eval=false",
        *TINY,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    parent = next(r for r in _runs() if r.data.params.get("regime") == "sequential")
    children = [r for r in _runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [c.info.run_name for c in children] == ["inv", "ptb"]
    steps = [h.step for h in MlflowClient().get_metric_history(parent.info.run_id, "val/clean_acc")]
    assert steps == [0, 1, 2]  # one curve across both phases
    assert [
        h.step for h in MlflowClient().get_metric_history(children[1].info.run_id, "val/pgd_acc")
    ] == [2]
    assert parent.data.metrics["inv/epochs_run"] == 2 and parent.data.metrics["ptb/epochs_run"] == 1


def test_joint_validates_its_mixture_and_trains(tracking, tmp_path):
    ensure_experiment("robustlab")
    bad = mlflow_run("joint", tmp_path, "mix_clean=0.5", "mix_ptb=0.5", "mix_inv=0.5", *TINY)
    assert bad.returncode != 0 and "must sum to 1" in bad.stderr
    assert _runs()[-1].info.status == "FAILED"
    out = mlflow_run(
        "joint",
        tmp_path,
        "epochs=1",
        "mix_clean=0.5",
        "mix_ptb=0.25",
        "mix_inv=0.25",
        "robust_eval=false",
        *TINY,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = _runs()[-1]
    assert run.info.status == "FINISHED"
    assert {"val/pgd_acc", "val/inv_acc", "test/inv_acc/tramer_linf_eps0.4"} <= set(
        run.data.metrics
    )


def test_experiment_smoke_report(tracking, tmp_path):
    ensure_experiment("robustlab")
    # two local worker processes of 7 pairs each: two start-ups, not 14
    args = ("budget=smoke", "seeds=2", "workers=2", "pairs_per_worker=7", f"data_dir={DATA_DIR}")
    out = mlflow_run("experiment", tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = _runs()
    parent = next(r for r in runs if r.data.tags.get("robustlab.kind") == "experiment")
    pid = parent.info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
    regimes = parent.data.params["regimes"].split(",")
    assert len(regimes) == 7 and len(children) == 7 * 2
    assert parent.data.metrics["experiment/parent_peak_rss_mb"] < 1024  # it never trains
    assert {c.data.tags["robustlab.experiment_regime"] for c in children} == set(regimes)

    # comparison.csv: one row per regime x logged test metric, n_seeds = 2 everywhere
    path = mlflow.artifacts.download_artifacts(run_id=pid, artifact_path="comparison.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert {r["regime"] for r in rows} == set(regimes)
    assert {r["n_seeds"] for r in rows} == {"2"}
    for regime in regimes:
        metrics = {r["metric"] for r in rows if r["regime"] == regime}
        assert {"test/clean_acc", "test/pgd40_acc", "test/inv_acc/tramer_linf_eps0.3"} <= metrics
    table = mlflow.artifacts.load_text(f"runs:/{pid}/comparison.md").splitlines()
    assert len(table) == 2 + len(regimes)

    # the report judges the children's logged numbers (verdict rules: tests/test_report.py)
    results: dict[str, dict[str, list[float]]] = {}
    for c in children:
        per_regime = results.setdefault(c.data.tags["robustlab.experiment_regime"], {})
        for metric in (CLEAN, PGD, INV):
            per_regime.setdefault(metric, []).append(c.data.metrics[metric])
    expected = [v.verdict for v in verdicts(results)]
    report = mlflow.artifacts.load_text(f"runs:/{pid}/report.md")
    verdict_lines = [line.split("**")[1] for line in report.splitlines() if line.startswith("**")]
    assert verdict_lines == expected
    assert [parent.data.tags[f"robustlab.claim{i}"] for i in (1, 2, 3)] == expected
    plots = {a.path for a in MlflowClient().list_artifacts(pid, "plots/curves")}
    assert len(plots) == len(regimes)

    # leakage: no evaluated test image is the source of any invariance example a run trained on
    # one test set per comparison: every regime x seed evaluated on the very same images
    pools = load_inv_pools(str(DATA_DIR))
    pool_sources = {int(i) for s in pools.used_sets for i in s.source_index}
    shared = _json(pid, "evaluated_test_indices.json")["indices"]
    assert len(shared) == len(set(shared)) == 200  # the smoke budget's eval_size
    for child in children:
        excluded = set(_json(child.info.run_id, "excluded_test_indices.json")["indices"])
        evaluated = _json(child.info.run_id, "evaluated_test_indices.json")["indices"]
        assert evaluated == shared, child.info.run_name
        assert pool_sources <= excluded and not set(evaluated) & excluded, child.info.run_name
        assert np.isfinite(child.data.metrics["test/clean_acc"])
        assert child.data.metrics["test/n_eval"] == 200


def test_experiment_resume_reuses_finished_children(tracking, tmp_path):
    ensure_experiment("robustlab")
    first = ("budget=smoke", "regimes=vanilla,invariance", f"data_dir={DATA_DIR}")
    out = mlflow_run("experiment", tmp_path, "seeds=1", *first)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = _runs()
    old_parent = next(r for r in runs if r.data.tags.get("robustlab.kind") == "experiment")
    old = {
        r.data.tags["robustlab.experiment_regime"]: r.info.run_id
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == old_parent.info.run_id
    }
    # simulate an interruption inside the invariance child
    MlflowClient().set_terminated(old["invariance"], "FAILED")

    with pytest.raises(ConfigError, match="same budget"):
        run_experiment(
            "default", 2, "vanilla,invariance", str(DATA_DIR), resume_run_id=old_parent.info.run_id
        )

    out = mlflow_run(
        "experiment", tmp_path, "seeds=2", *first, f"resume_run_id={old_parent.info.run_id}"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reusing run " + old["vanilla"] in out.stderr
    runs = _runs()
    parent = next(
        r for r in runs if r.data.tags.get("robustlab.resumed_from") == old_parent.info.run_id
    )
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_key = {
        (c.data.tags["robustlab.experiment_regime"], c.data.tags["robustlab.seed"]): c
        for c in children
    }
    assert set(by_key) == {(r, s) for r in ("vanilla", "invariance") for s in ("0", "1")}
    assert (
        by_key[("vanilla", "0")].info.run_id == old["vanilla"]
    )  # reused, moved under the new parent
    assert by_key[("invariance", "0")].info.run_id != old["invariance"]  # the failed one ran again
    assert all(c.info.status == "FINISHED" for c in children)
    text = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/comparison.csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and {r["n_seeds"] for r in rows} == {"2"}  # the reused seed counts
