"""End to end through `mlflow run`: perturbation, chaining via init_model, sequential, joint, experiment."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from robustlab.data.pools import load_inv_pools
from robustlab.errors import ConfigError
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


CV = ("inv_folds=2", "allow_small_folds=true")  # 2 folds: small, so allowed explicitly


def _table(run_id: str, name: str) -> list[dict]:
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/tables/{name}.csv")
    return list(csv.DictReader(io.StringIO(text)))


def test_experiment_cv_smoke_report(tracking, tmp_path):
    ensure_experiment("robustlab")
    # two local worker processes of 6 units each: two start-ups, not 12
    args = ("budget=smoke", "seeds=1", "workers=2", "pairs_per_worker=6", f"data_dir={DATA_DIR}")
    out = mlflow_run("experiment", tmp_path, *args, *CV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fold 1: " in out.stderr and "label-changed" in out.stderr  # printed before training
    runs = _runs()
    parent = next(r for r in runs if r.data.tags.get("robustlab.kind") == "experiment")
    pid = parent.info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
    regimes = parent.data.params["regimes"].split(",")
    folds = {}
    for c in children:
        folds.setdefault(c.data.tags["robustlab.experiment_regime"], set()).add(
            int(c.data.tags["robustlab.fold"])
        )
    assert folds == {r: ({-1} if r in ("vanilla", "perturbation") else {0, 1}) for r in regimes}
    assert len(children) == 2 + 5 * 2
    assert parent.data.metrics["experiment/parent_peak_rss_mb"] < 1024  # it never trains
    # the leader's progress: a line per completed unit and the counts on the parent run
    assert "experiment: 12 of 12 complete, 0 running" in out.stderr
    assert parent.data.metrics["experiment/complete"] == 12
    assert parent.data.metrics["experiment/left"] == 0

    # the invariance table: every example predicted exactly once per (regime, seed)
    inv = _table(pid, "inv_predictions")
    keys = [(r["regime"], r["seed"], r["set"], r["index"]) for r in inv]
    assert len(keys) == len(set(keys)) == 7 * 793
    # ... by a run that never trained or validated on the example's source (its logged exclusions)
    excluded = {
        c.info.run_id: set(_json(c.info.run_id, "excluded_test_indices.json")["indices"])
        for c in children
    }
    assert all(int(r["source_index"]) not in excluded[r["run_id"]] for r in inv)
    assert any(excluded.values())  # the fold runs did exclude their training sources
    test = _table(pid, "test_outcomes")
    assert len(test) == 7 * 200 and {r["models"] for r in test if r["regime"] == "joint"} == {"2"}
    # PGD-40 on the budget's fixed subset (smoke: 50 of the 200), the same images for all
    attacked = {r["regime"]: set() for r in test}
    for r in test:
        if r["pgd40"] != "":
            attacked[r["regime"]].add(r["source_index"])
    assert {len(v) for v in attacked.values()} == {50} and len(
        {frozenset(v) for v in attacked.values()}
    ) == 1
    # sequential_ptb_inv's fold models fine-tune the seed's perturbation model
    by_regime = {}
    for c in children:
        by_regime.setdefault(c.data.tags["robustlab.experiment_regime"], []).append(c)
    [ptb] = by_regime["perturbation"]
    assert {
        c.data.tags.get("robustlab.first_phase_from") for c in by_regime["sequential_ptb_inv"]
    } == {ptb.info.run_id}
    # claim 1's regimes train on the same thesis examples, with other labels
    for label, source in (("invariance", "human"), ("invariance_target", "target")):
        for c in by_regime[label]:
            assert c.data.params["inv_pool"] == "thesis_linf_eps0.3"
            assert c.data.params["inv_label_source"] == source

    # one test set for everything compared, disjoint from every invariance source
    from robustlab.experiment.plan import invariance_sources

    shared = _json(pid, "evaluated_test_indices.json")["indices"]
    assert len(shared) == len(set(shared)) == 200
    assert not set(shared) & set(invariance_sources(str(DATA_DIR)).tolist())
    for child in children:
        assert _json(child.info.run_id, "evaluated_test_indices.json")["indices"] == shared
        report = _json(child.info.run_id, "evaluation.json")
        assert report["subset_seed"] == 0  # the curve subset is fixed per experiment

    # every figure is recomputed from the two tables; the verdicts match the tags and report
    from robustlab.experiment.estimates import compute_figures

    fig = compute_figures(inv, test, regimes, [0])
    tags = [parent.data.tags[f"robustlab.claim{i}"] for i in (1, 2, 3)]
    assert [c.verdict for c in fig.claims] == tags
    report = mlflow.artifacts.load_text(f"runs:/{pid}/report.md")
    for c in fig.claims:
        [row] = [ln for ln in report.splitlines() if ln.startswith(f"| {c.claim.text} |")]
        assert row.startswith(f"| {c.claim.text} | **{c.verdict}**")
        # claim 3 also shows its verdict without part 3c (PGD-40 alone must not decide it)
        assert ("without 3c" in row) == (c.claim.text.startswith("(3)"))
    # ... and so does the offline report: exported to a folder, then recomputed from its files
    # alone by the commands report.md prints
    folder = tmp_path / "published"
    lines = report.splitlines()
    commands = [ln for ln in lines if ln.startswith("robustlab report ")]
    assert commands == [
        f"robustlab report --run-id {pid} --out {commands[0].split()[-1]}",
        f"robustlab report --tables {commands[0].split()[-1]}",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for args in (
        ["--run-id", pid, "--out", str(folder)],
        ["--tables", str(folder), "--out", str(tmp_path / "again")],
    ):
        out = subprocess.run(
            ["robustlab", "report", *args], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert [
            ln.split(": ", 1)[1].split(" (without")[0] for ln in out.stdout.splitlines()
        ] == tags
    assert {"run.json", "folds.csv", "inv_predictions.csv", "test_outcomes.csv"} <= {
        p.name for p in folder.iterdir()
    }
    assert (tmp_path / "again" / "report.md").read_text() == (folder / "report.md").read_text()
    # both reports give the command that resumes this experiment: its study named
    study = parent.data.tags["robustlab.study"]
    for text in (report, (folder / "report.md").read_text()):
        [command] = [ln for ln in text.splitlines() if ln.startswith("robustlab experiment ")]
        assert "--budget smoke --seeds 1 " in command
        assert command.endswith(f" --fold-seed 0 --allow-small-folds true --study-name {study}")
    run = json.loads((folder / "run.json").read_text())
    assert run["seeds"] == [0] and set(run["unit_seconds"]) == set(regimes)
    # two workers ran units side by side: the wall time they were busy lies between half the
    # worker time and all of it; one leader, so the report gives its wall time alone
    assert run["worker_seconds"] / 2 <= run["busy_seconds"] < run["worker_seconds"]
    assert run["leaders"] == 1 and "leaders" not in (folder / "report.md").read_text()
    assert min(run["eval_share"].values()) > 0 and max(run["eval_share"].values()) < 1
    names = {a.path for a in MlflowClient().list_artifacts(pid)}
    assert {"report.md", "forest_plot.png", "folds.csv", "folds.json", "tables"} <= names
    assert len({a.path for a in MlflowClient().list_artifacts(pid, "plots/curves")}) == 7


def test_experiment_resume_reuses_finished_children(tracking, tmp_path):
    ensure_experiment("robustlab")
    # one worker process for all of a run's units: the resume, not the start-ups, is under test
    first = (
        "budget=smoke",
        "regimes=vanilla,invariance",
        "pairs_per_worker=4",
        f"data_dir={DATA_DIR}",
        *CV,
    )
    out = mlflow_run("experiment", tmp_path, "seeds=1", *first)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = _runs()
    old_parent = next(r for r in runs if r.data.tags.get("robustlab.kind") == "experiment")
    old = {
        (r.data.tags["robustlab.experiment_regime"], r.data.tags["robustlab.fold"]): r.info.run_id
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == old_parent.info.run_id
    }
    assert set(old) == {("vanilla", "-1"), ("invariance", "0"), ("invariance", "1")}
    # simulate an interruption inside one fold of the invariance regime
    MlflowClient().set_terminated(old[("invariance", "0")], "FAILED")

    from robustlab.experiment.run import Options

    with pytest.raises(ConfigError, match="same budget"):
        run_experiment(
            "default",
            2,
            "vanilla,invariance",
            str(DATA_DIR),
            options=Options(resume_run_id=old_parent.info.run_id),
            inv_folds=2,
            allow_small_folds=True,
        )

    out = mlflow_run(
        "experiment", tmp_path, "seeds=2", *first, f"resume_run_id={old_parent.info.run_id}"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reusing run " + old[("vanilla", "-1")] in out.stderr
    runs = _runs()
    parent = next(
        r for r in runs if r.data.tags.get("robustlab.resumed_from") == old_parent.info.run_id
    )
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_key = {
        (
            c.data.tags["robustlab.experiment_regime"],
            c.data.tags["robustlab.seed"],
            c.data.tags["robustlab.fold"],
        ): c
        for c in children
    }
    assert set(by_key) == {
        (r, s, f)
        for s in ("0", "1")
        for r, f in (("vanilla", "-1"), ("invariance", "0"), ("invariance", "1"))
    }
    assert by_key[("vanilla", "0", "-1")].info.run_id == old[("vanilla", "-1")]  # reused, moved
    assert by_key[("invariance", "0", "1")].info.run_id == old[("invariance", "1")]
    assert by_key[("invariance", "0", "0")].info.run_id != old[("invariance", "0")]  # ran again
    assert all(c.info.status == "FINISHED" for c in children)
    inv = _table(parent.info.run_id, "inv_predictions")
    assert {r["seed"] for r in inv} == {"0", "1"}  # the reused seed counts
    # published: the units' times from the finished units the tables hold (the reused ones too)
    from robustlab.experiment.published import export

    run = export(parent.info.run_id, tmp_path / "published").run
    assert run["units"] == {"vanilla": 2, "invariance": 4}
    assert run["worker_seconds"] == pytest.approx(sum(run["unit_seconds"].values()), abs=0.2)
