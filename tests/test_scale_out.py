"""Workers that share nothing but two URLs: a real PostgreSQL and a real MLflow server on it.

Each worker runs in its own cwd with its own HOME; models travel through the server.
Also the bad input of the scaled set-up: wrong credentials or host, a tracking URI that is not
MLflow, a worker on a study whose objectives differ.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from robustlab.cli import main
from robustlab.launch.launcher import ATTR_EXPERIMENT, ATTR_PARENT, LOST_TAG
from robustlab.tune.plan import ATTR_CONFIG
from tests.conftest import DATA_DIR, free_port
from tests.scale_support import (
    machine,
    needs_postgres,
    reap_fixture,  # noqa: F401 - the `reap` fixture
    robustlab,
    start_services,
    stop_services,
    trial_runs,
    tune_args,
    worker,
)

SEL_METRICS = ("sel/clean_acc", "sel/pgd_acc", "sel/inv_bal_acc")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    services = start_services(tmp_path_factory.mktemp("scale") / "tracking")
    yield services
    stop_services(services)


def _one_error_line(out: subprocess.CompletedProcess, command: str) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"robustlab {command}: error: "), out.stderr
    return lines[0]


@needs_postgres
@pytest.mark.slow
def test_two_workers_on_two_urls_complete_every_trial_once(live, tmp_path, reap):
    name, n_trials = "scale2", 3
    coord, coord_env = machine(tmp_path, "coordinator", live)
    made = robustlab([*tune_args(name, n_trials), "--create-only", "true"], coord, coord_env)
    assert made.returncode == 0, made.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=live.storage)
    assert study.get_trials() == []  # created, no trial run
    parent_id = study.user_attrs[ATTR_PARENT]

    places = [machine(tmp_path, f"worker{i}", live) for i in range(2)]
    procs = [worker(name, cwd, env) for cwd, env in places]
    reap.extend(procs)
    codes = [p.wait(timeout=900) for p in procs]
    logs = [(cwd / "worker.log").read_text() for cwd, _ in places]
    assert codes == [0, 0], [log[-2000:] for log in logs]

    trials = optuna.load_study(study_name=name, storage=live.storage).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert n_trials <= len(trials) <= n_trials + 1  # MaxTrialsCallback: overshoot <= workers - 1
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == len(trials)  # one run per trial, none shared
    runs = {r.info.run_id: r for r in trial_runs(live, parent_id)}
    assert set(runs) == set(run_ids)  # and no stray run under the parent
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["robustlab.trial"] == str(t.number)
        assert [run.data.metrics[m] for m in SEL_METRICS] == pytest.approx(t.values)
    # both workers did trials, and each trial was done by one of them only
    done = [set(re.findall(r"^trial (\d+): ", log, re.M)) for log in logs]
    assert all(done) and not done[0] & done[1], logs
    assert set.union(*done) == {str(t.number) for t in trials}
    for cwd, _ in places:  # nothing stays on the "machines": no local store, no mlruns
        left = [p for p in cwd.rglob("*") if p.is_file() and p.name != "worker.log"]
        assert [p for p in left if "home" not in p.relative_to(cwd).parts] == []
    stored = list((live.folder / "services" / "artifacts").rglob("MLmodel"))
    assert len(stored) >= len(trials)

    # a third machine loads every model over HTTP
    reader, reader_env = machine(tmp_path, "reader", live)
    code = (
        "import sys, numpy as np, mlflow\n"
        "for run_id in sys.argv[1:]:\n"
        "    m = mlflow.pyfunc.load_model(f'runs:/{run_id}/model')\n"
        "    print('shape', *m.predict(np.zeros((2, 28, 28, 1), np.float32)).shape)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *run_ids],
        cwd=reader,
        env=reader_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    shapes = [line for line in out.stdout.splitlines() if line.startswith("shape ")]
    assert shapes == ["shape 2 10"] * len(run_ids), out.stdout[-2000:]

    # the coordinator summarizes the finished study: no new trial, a parent holding the summary
    summary = robustlab(tune_args(name, n_trials), coord, coord_env)
    assert summary.returncode == 0, summary.stderr[-3000:]
    after = optuna.load_study(study_name=name, storage=live.storage)
    assert len(after.get_trials()) == len(trials)
    new_parent = after.user_attrs[ATTR_PARENT]
    assert new_parent != parent_id
    assert {r.info.run_id for r in trial_runs(live, new_parent)} == set(run_ids)  # adopted
    names = {a.path for a in live.client().list_artifacts(new_parent)}
    assert {"trials.csv", "front.csv", "front.md"} <= names

    # register against the server: the champion is one of the study's trial models
    small = ["--eval-size", "60", "--autoattack-size", "0", "--pgd-restarts", "1"]
    small += ["--batch-size", "60", "--curve-size", "20", "--curve-points", "3"]
    reg = robustlab(
        ["register", "--study-name", name, "--name", "scale-mnist", "--clean-floor", "0", *small],
        coord,
        coord_env,
    )
    assert reg.returncode == 0, reg.stderr[-3000:]
    champion = live.client().get_model_version_by_alias("scale-mnist", "champion")
    assert champion.run_id in run_ids


@needs_postgres
@pytest.mark.slow
def test_experiment_pairs_spread_over_two_workers_on_two_urls(live, tmp_path, reap):
    name = "exp2"
    coord, coord_env = machine(tmp_path, "coordinator", live)
    args = ["experiment", "--budget", "smoke", "--seeds", "1", "--regimes", "vanilla,invariance"]
    args += ["--data-dir", str(DATA_DIR), "--study-name", name]
    args += ["--inv-folds", "2", "--allow-small-folds", "true"]
    made = robustlab([*args, "--create-only", "true"], coord, coord_env)
    assert made.returncode == 0, made.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=live.storage)
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * 3

    places = [machine(tmp_path, f"worker{i}", live) for i in range(2)]
    procs = [worker(name, cwd, env, "experiment-worker") for cwd, env in places]
    reap.extend(procs)
    codes = [p.wait(timeout=900) for p in procs]
    logs = [(cwd / "worker.log").read_text() for cwd, _ in places]
    assert codes == [0, 0], [log[-2000:] for log in logs]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # every unit exactly once
    pairs = {
        (t.params["regime"], t.params["seed"], t.params["fold"]): t.user_attrs["mlflow_run_id"]
        for t in trials
    }
    assert set(pairs) == {
        (r, s, f) for s in (0,) for r, f in (("vanilla", -1), ("invariance", 0), ("invariance", 1))
    }
    done = [set(re.findall(r"^trial (\d+): ", log, re.M)) for log in logs]
    assert all(done) and not done[0] & done[1], logs  # both worked, never on the same pair
    for cwd, _ in places:  # nothing stays on the "machines"
        left = [p for p in cwd.rglob("*") if p.is_file() and p.name != "worker.log"]
        assert [p for p in left if "home" not in p.relative_to(cwd).parts] == []

    # the coordinator summarizes: no pair trained again, a new parent adopts the three runs
    summary = robustlab(args, coord, coord_env)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert len(study.get_trials()) == 3
    parent_id = study.user_attrs[ATTR_PARENT]
    children = trial_runs(live, parent_id)
    assert sorted(c.info.run_id for c in children) == sorted(pairs.values())
    client = live.client()

    def indices(run_id: str) -> list[int]:
        (tmp_path / run_id).mkdir()
        path = client.download_artifacts(
            run_id, "evaluated_test_indices.json", str(tmp_path / run_id)
        )
        with open(path) as f:
            return json.load(f)["indices"]

    shared = indices(parent_id)
    assert len(shared) == len(set(shared)) == 200  # the smoke budget's eval_size
    for c in children:
        key = (
            c.data.tags["robustlab.experiment_regime"],
            int(c.data.tags["robustlab.seed"]),
            int(c.data.tags["robustlab.fold"]),
        )
        assert pairs[key] == c.info.run_id and c.info.status == "FINISHED"
        assert {"test/clean_acc", "test/pgd40_acc"} <= set(c.data.metrics)
        assert c.data.metrics["test/n_eval"] == 200
        assert indices(c.info.run_id) == shared
    names = {a.path for a in client.list_artifacts(parent_id)}
    assert {"report.md", "forest_plot.png", "tables"} <= names
    tags = client.get_run(parent_id).data.tags
    assert {"robustlab.claim1", "robustlab.claim2", "robustlab.claim3"} <= set(tags)


@needs_postgres
@pytest.mark.slow
def test_wrong_credentials_or_host_are_one_line_and_leave_nothing(live, tmp_path):
    coord, env = machine(tmp_path, "coordinator", live)
    wrong_password = live.storage.replace("robustlab:", "robustlab:x", 1)
    secret = live.storage.split(":")[2].split("@")[0]
    wrong_host = live.storage.rsplit("@", 1)[0] + f"@127.0.0.1:{free_port()}/optuna"
    for storage, why in (
        (wrong_password, "refused the user or password"),
        (wrong_host, "cannot connect to PostgreSQL"),
    ):
        for argv, command in (
            (tune_args("bad", 1), "tune"),
            (["tune-worker", "--study-name", "bad"], "tune-worker"),
            (["experiment-worker", "--study-name", "bad"], "experiment-worker"),
            (
                ["experiment", "--budget", "smoke", "--seeds", "1", "--regimes", "vanilla"]
                + ["--study-name", "bad", "--create-only", "true"],
                "experiment",
            ),
        ):
            # the URL (with its password) only in the environment, never on the command line
            out = robustlab(argv, coord, {**env, "ROBUSTLAB_OPTUNA_STORAGE": storage}, timeout=120)
            line = _one_error_line(out, command)
            assert why in line and "cannot open the study storage" in line
            assert secret not in line  # the password is never printed
    assert "bad" not in optuna.get_all_study_names(live.storage)
    exps = [e.experiment_id for e in live.client().search_experiments()]
    assert not [
        r for r in live.client().search_runs(exps) if r.data.tags.get("robustlab.study") == "bad"
    ]


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    code = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.code)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>OK</html>")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("code", "message"),
    [(200, "is not an MLflow tracking server"), (404, "answered /health with HTTP 404")],
)
def test_a_tracking_uri_that_is_not_mlflow_is_one_line(
    tracking, tmp_path, capsys, monkeypatch, code, message
):
    handler = type("Handler", (_NotMlflow,), {"code": code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        argv = ["tune", "--budget", "smoke", "--storage", storage, "--data-dir", str(DATA_DIR)]
        assert main([*argv, "--create-only", "true"]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustlab tune: error: ") and message in err[0]
    assert optuna.get_all_study_names(storage) == []  # nothing half-written


def test_a_worker_on_a_study_with_other_objectives_is_refused(tracking, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # a study that claims a 3-objective (pareto) configuration but has one direction
    study = optuna.create_study(study_name="odd", storage=storage, direction="minimize")
    study.set_user_attr(ATTR_PARENT, "0" * 32)
    study.set_user_attr(ATTR_EXPERIMENT, "0")
    study.set_user_attr(ATTR_CONFIG, json.dumps({"objective": "pareto", "budget": "smoke"}))
    assert main(["tune-worker", "--study-name", "odd", "--storage", storage]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustlab tune-worker: error: ")
    assert "1 objective direction(s) ['minimize']" in err[0] and "objective=pareto" in err[0]
    assert study.get_trials() == []
    assert main(["tune-worker", "--study-name", "nosuch", "--storage", storage]) == 2
    assert "no study 'nosuch'" in capsys.readouterr().err


def test_a_retry_continues_only_from_an_intact_checkpoint(tracking, tmp_path):
    import keras
    import mlflow

    from robustlab.launch.launcher import checkpointed_run
    from robustlab.train.checkpoint import LoopState, log_checkpoint, save_checkpoint

    model = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    folder = save_checkpoint(tmp_path / "ckpt", model, optimizer, None, LoopState(global_epoch=0))
    with mlflow.start_run() as whole:
        log_checkpoint(folder, whole.info.run_id)
    with mlflow.start_run() as partial:  # killed while uploading: state.json never arrived
        mlflow.log_artifact(str(folder / "model.weights.h5"), "checkpoint/slot0")
    with mlflow.start_run() as none:
        pass
    with mlflow.start_run() as finished:  # its worker died after the run ended, before the tell
        log_checkpoint(folder, finished.info.run_id)
    client = MlflowClient()
    for run in (whole, partial, none):  # a killed worker's run stays RUNNING
        client.update_run(run.info.run_id, status="RUNNING")
    assert checkpointed_run(whole.info.run_id)[0] == whole.info.run_id
    assert checkpointed_run(partial.info.run_id)[0] is None
    assert checkpointed_run(none.info.run_id)[0] is None
    assert checkpointed_run(None)[0] is None
    # a finished run cannot be continued: the retry starts afresh, that run ends FAILED, lost
    run_id, note = checkpointed_run(finished.info.run_id)
    assert run_id is None and "never told" in note
    done = client.get_run(finished.info.run_id)
    assert done.info.status == "FAILED" and LOST_TAG in done.data.tags


def _together(argv: list[str], places, timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """The same command started at once in each place (its own directory and HOME)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "robustlab.cli", *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cwd, env in places
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return outs


@needs_postgres
@pytest.mark.slow
def test_identical_tune_commands_started_together_share_one_study(live, tmp_path):
    name = "together"
    places = [machine(tmp_path, f"m{i}", live) for i in range(2)]
    outs = _together(tune_args(name, 4), places)
    assert [o.returncode for o in outs] == [0, 0], [o.stderr[-3000:] for o in outs]
    assert "Traceback" not in outs[0].stderr + outs[1].stderr
    joined = [o for o in outs if "joining it as a worker" in o.stderr]
    assert len(joined) == 1  # one leads (parent run, summary), the other works for it
    study = optuna.load_study(study_name=name, storage=live.storage)
    trials = study.get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials) and len(trials) >= 4
    client = live.client()
    parents = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("robustlab.kind") == "tune"
        and r.data.tags.get("robustlab.study") == name
    ]
    assert len(parents) == 1 and parents[0].info.run_id == study.user_attrs[ATTR_PARENT]
    runs = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(runs)) == len(runs)  # one run per trial
    children = {r.info.run_id for r in trial_runs(live, parents[0].info.run_id)}
    assert children == set(runs)
    names = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert "trials.csv" in names  # the leader summarized every trial, the joiner's too


@needs_postgres
@pytest.mark.slow
def test_identical_experiment_commands_started_together_share_one_study(live, tmp_path):
    name = "exp-together"
    places = [machine(tmp_path, f"m{i}", live) for i in range(2)]
    argv = ["experiment", "--budget", "smoke", "--seeds", "1", "--regimes", "vanilla,invariance"]
    argv += ["--inv-folds", "2", "--allow-small-folds", "true", "--data-dir", str(DATA_DIR)]
    outs = _together([*argv, "--study-name", name], places)
    assert [o.returncode for o in outs] == [0, 0], [o.stderr[-3000:] for o in outs]
    assert sum("joining it as a worker" in o.stderr for o in outs) == 1
    study = optuna.load_study(study_name=name, storage=live.storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # every unit once
    parent = study.user_attrs[ATTR_PARENT]
    children = trial_runs(live, parent)
    assert sorted(c.info.run_id for c in children) == sorted(
        t.user_attrs["mlflow_run_id"] for t in trials
    )
    assert "report.md" in {a.path for a in live.client().list_artifacts(parent)}
