"""The bad-input matrix: every entry point, through the real `robustlab` console script.

Each case must end with exactly one line `robustlab <command>: error: <problem and fix>` on
stderr (library start-up noise aside), a non-zero exit code, no traceback, and **no run created**
in the tracking store (runs are counted before and after). Through `mlflow run`, which creates
the run before our command starts, the run must end FAILED with the error recorded on it.

New entry points add their cases to `CASES` (see the `tune` / `register` placeholders below).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, free_port

BIN = Path(sys.executable).parent
# lines TensorFlow's C++ logging prints whatever TF_CPP_MIN_LOG_LEVEL says
NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} \d\d:\d\d)")
NO_RUN = "runs:/0123456789abcdef0123456789abcdef/model"  # well-formed, names no run

# (id, arguments, fragment of the one error line). Placeholders: {store} an existing label
# store, {new_store} a path with no file, {vanilla_run} a vanilla run without checkpoint,
# {busy_port} a port another socket listens on, {tmp} a scratch folder, {corrupt} a folder with
# a corrupt mnist.npz.
TRAINING_CASES = [
    ("epochs-negative", ["vanilla", "--epochs", "-1"], "epochs must be >= 0"),
    ("model-unknown", ["vanilla", "--model", "resnet"], "unknown model 'resnet'"),
    ("train-size-negative", ["vanilla", "--train-size", "-5"], "train_size must be >= 0"),
    ("train-size-below-batch", ["vanilla", "--train-size", "100"], "smaller than one batch"),
    ("eval-size-negative", ["vanilla", "--eval-size", "-1"], "eval_size must be >= 0"),
    ("seed-negative", ["vanilla", "--seed", "-1"], "seed must lie in [0, 2**32 - 1]"),
    ("seed-too-large", ["vanilla", "--seed", str(2**32)], "seed must lie in [0, 2**32 - 1]"),
    ("seed-not-int", ["vanilla", "--seed", "abc"], "argument --seed: invalid int value"),
    ("lr-inf", ["vanilla", "--learning-rate", "inf"], "learning_rate must be a finite number"),
    ("lr-nan", ["vanilla", "--learning-rate", "nan"], "learning_rate must be a finite number"),
    ("lr-zero", ["vanilla", "--learning-rate", "0"], "learning_rate must be > 0"),
    ("batch-size-zero", ["vanilla", "--batch-size", "0"], "batch_size must be >= 1"),
    ("patience-negative", ["vanilla", "--patience", "-1"], "patience must be >= 0"),
    ("lr-schedule-unknown", ["vanilla", "--lr-schedule", "linear"], "unknown lr_schedule 'linear'"),
    ("optimizer-unknown", ["vanilla", "--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
    ("auto-resume-nameless", ["vanilla", "--auto-resume"], "--auto-resume needs --run-name"),
    ("autoattack-negative", ["vanilla", "--autoattack-size", "-1"], "autoattack_size must be"),
    ("pgd-restarts-negative", ["vanilla", "--pgd-restarts", "-1"], "pgd_restarts must be >= 0"),
    ("robust-eval-maybe", ["vanilla", "--robust-eval", "maybe"], "expected true/false"),
    ("all-curves-perhaps", ["vanilla", "--all-curves", "perhaps"], "expected true/false"),
    ("data-dir-missing", ["vanilla", "--data-dir", "/no/such/dir"], "no mnist.npz there"),
    ("mnist-corrupt", ["vanilla", "--data-dir", "{corrupt}"], "not a readable .npz file"),
    ("init-model-scheme", ["vanilla", "--init-model", "foo://bar/model"], "unknown scheme"),
    (
        "init-model-unregistered",
        ["vanilla", "--init-model", "models:/no_such_model@champion"],
        "no registered model 'no_such_model'",
    ),
    ("init-model-no-run", ["vanilla", "--init-model", NO_RUN], "no run 0123456789abcdef"),
    ("init-model-no-path", ["vanilla", "--init-model", "/no/such/model"], "no such file"),
    ("resume-no-run", ["vanilla", "--resume-run-id", "deadbeef"], "no such run"),
    (
        "resume-other-entry-point",
        ["perturbation", "--resume-run-id", "{vanilla_run}"],
        "is a vanilla run, not perturbation; resume it with `robustlab vanilla`",
    ),
    (
        "resume-without-checkpoint",
        ["vanilla", "--resume-run-id", "{vanilla_run}"],
        "no checkpoint in that run",
    ),
    ("eps-above-one", ["perturbation", "--eps", "1.5"], "eps must lie in [0, 1]"),
    ("eps-negative", ["perturbation", "--eps", "-0.1"], "eps must lie in [0, 1]"),
    ("eps-nan", ["perturbation", "--eps", "nan"], "eps must be a finite number"),
    ("attack-steps-zero", ["perturbation", "--attack-steps", "0"], "attack_steps must be >= 1"),
    ("step-size-negative", ["perturbation", "--step-size", "-0.1"], "step_size must be > 0"),
    ("step-size-inf", ["perturbation", "--step-size", "inf"], "step_size must be a finite"),
    (
        "eps-warmup-too-long",
        ["perturbation", "--epochs", "2", "--eps-warmup", "5"],
        "eps_warmup=5 epochs is longer than the ptb phase (2 epochs)",
    ),
    ("eps-warmup-nan", ["perturbation", "--eps-warmup", "nan"], "eps_warmup must be a finite"),
    ("eps-warmup-negative", ["perturbation", "--eps-warmup", "-1"], "eps_warmup must be >= 0"),
    ("method-unknown", ["perturbation", "--method", "fgsm"], "unknown method 'fgsm'"),
    ("trades-beta-negative", ["perturbation", "--trades-beta", "-1"], "trades_beta must be >= 0"),
    ("trades-beta-nan", ["perturbation", "--trades-beta", "nan"], "trades_beta must be a finite"),
    ("trades-beta-inf", ["joint", "--trades-beta", "inf"], "trades_beta must be a finite"),
    (
        "trades-no-steps",
        ["perturbation", "--method", "trades", "--attack-steps", "0"],
        "attack_steps must be >= 1 for method=trades",
    ),
    (
        "inv-pool-unknown",
        ["invariance", "--inv-pool", "thesis_linf_epsXYZ"],
        "unknown invariance set 'thesis_linf_epsXYZ'",
    ),
    ("inv-pool-no-file", ["invariance", "--inv-pool", "/no/such/store.json"], "no such label"),
    (
        "inv-pool-unlabelled",
        ["invariance", "--inv-pool", "thesis_linf_eps0.4", "--train-size", "256"],
        "has no human labels",
    ),
    ("inv-mix-zero", ["invariance", "--mix-inv", "0"], "mix_inv must lie in (0, 1]"),
    ("inv-mix-nan", ["invariance", "--mix-inv", "nan"], "mix_inv must lie in (0, 1]"),
    ("inv-label-source", ["invariance", "--inv-label-source", "crowd"], "invalid choice: 'crowd'"),
    (
        "sequential-mix-inv-zero",
        ["sequential", "--mix-inv", "0"],
        "mix_inv must lie in (0, 1] for the sequential regime",
    ),
    ("sequential-order", ["sequential", "--order", "sideways"], "unknown order 'sideways'"),
    ("sequential-ptb-epochs", ["sequential", "--ptb-epochs", "-1"], "ptb_epochs must be >= 0"),
    (
        "sequential-warmup",
        ["sequential", "--ptb-epochs", "1", "--eps-warmup", "2"],
        "longer than the ptb phase (1 epochs)",
    ),
    (
        "joint-mix-sum",
        ["joint", "--mix-clean", "0.5", "--mix-ptb", "0.5", "--mix-inv", "0.5"],
        "must sum to 1",
    ),
    ("joint-mix-inf", ["joint", "--mix-ptb", "inf"], "mix_ptb must lie in [0, 1]"),
    ("precision-unknown", ["perturbation", "--precision", "float16"], "precision must be one of"),
]

EVALUATE_CASES = [
    ("evaluate-no-model-uri", ["evaluate"], "the following arguments are required: --model-uri"),
    ("evaluate-empty-model-uri", ["evaluate", "--model-uri", " "], "--model-uri is empty"),
    ("evaluate-eps", ["evaluate", "--model-uri", NO_RUN, "--eps", "2"], "eps must lie in [0, 1]"),
    (
        "evaluate-batch",
        ["evaluate", "--model-uri", NO_RUN, "--batch-size", "0"],
        "batch-size must be >= 1",
    ),
    ("evaluate-seed", ["evaluate", "--model-uri", NO_RUN, "--seed", "-1"], "seed must lie in"),
    ("evaluate-engine", ["evaluate", "--model-uri", NO_RUN, "--pgd-engine", "x"], "pgd_engine"),
    (
        "evaluate-extra-attack",
        ["evaluate", "--model-uri", NO_RUN, "--extra-attacks", "cw"],
        "unknown extra attack(s) ['cw']",
    ),
    (
        "evaluate-data-dir",
        ["evaluate", "--model-uri", NO_RUN, "--data-dir", "/no/such/dir"],
        "no mnist.npz there",
    ),
    ("evaluate-scheme", ["evaluate", "--model-uri", "foo://bar"], "cannot load model"),
]

GENERATE_CASES = [
    ("generate-count-zero", ["generate", "--count", "0"], "--count 0 must be at least 1"),
    ("generate-start-negative", ["generate", "--start", "-1"], "--start -1 must be >= 0"),
    (
        "generate-range",
        ["generate", "--start", "59995", "--count", "10"],
        "outside the train split",
    ),
    ("generate-out-unwritable", ["generate", "--out", "/etc/hostname/c.npz"], "cannot write"),
    ("generate-out-folder", ["generate", "--out", "{tmp}"], "is a folder"),
    ("generate-eps-range", ["generate", "--eps", "1.5"], "eps=1.5 is outside (0, 1)"),
    ("generate-eps-nan", ["generate", "--eps", "nan"], "is outside (0, 1)"),
    ("generate-eps-text", ["generate", "--eps", "abc"], "eps 'abc' is not a number"),
    ("generate-norm", ["generate", "--norm", "l2"], "unknown norm 'l2'"),
    ("generate-split", ["generate", "--split", "val"], "unknown split 'val'"),
    (
        "generate-l0-eps",
        ["generate", "--norm", "l0", "--eps", "0.3"],
        "eps is not used by norm=l0 (it is an L-inf budget); drop --eps",
    ),
    (
        "generate-l0-transforms-zero",
        ["generate", "--norm", "l0", "--transforms", "0"],
        "--transforms 0 must be at least 1",
    ),
    (
        "generate-l0-option-with-linf",
        ["generate", "--max-candidates", "3"],
        "--max-candidates is used only by norm=l0",
    ),
    ("generate-l0-seed-text", ["generate", "--norm", "l0", "--seed", "x"], "expected an integer"),
]

LABEL_CASES = [
    (
        "label-port-range",
        ["label", "--store", "{store}", "--rater", "a", "--port", "70000"],
        "--port 70000 is not a port number",
    ),
    (
        "label-port-busy",
        ["label", "--store", "{store}", "--rater", "a", "--port", "{busy_port}"],
        "Address already in use); pick another --port",
    ),
    ("label-no-store", ["label", "--store", "{new_store}", "--rater", "a"], "no such label store"),
    ("label-no-mode", ["label", "--store", "{store}"], "nothing to do"),
    (
        "label-no-candidates",
        ["label", "--store", "{new_store}", "--init-from", "/no/such.npz"],
        "candidates file not found",
    ),
    (
        "label-store-exists",
        ["label", "--store", "{store}", "--import", "thesis"],
        "already exists; pass --force",
    ),
]

EXPERIMENT_CASES = [
    ("experiment-seeds-zero", ["experiment", "--seeds", "0"], "--seeds must be >= 1"),
    (
        "experiment-regime-unknown",
        ["experiment", "--regimes", "vanilla,bogus"],
        "unknown regime(s) ['bogus']",
    ),
    ("experiment-budget", ["experiment", "--budget", "huge"], "unknown budget 'huge'"),
    ("experiment-eps", ["experiment", "--eps", "nan"], "--eps must lie in (0, 1]"),
    ("experiment-folds-one", ["experiment", "--inv-folds", "1"], "inv_folds must be >= 2"),
    (
        "experiment-folds-too-many",
        ["experiment", "--inv-folds", "600"],
        "inv_folds=600 is more than the pool's 589 MNIST sources",
    ),
    (
        "experiment-folds-too-small",
        ["experiment", "--inv-folds", "3"],
        "leaves a fold model 75 label-changed examples to train on after its validation carve",
    ),
    (
        "experiment-verdicts-one-seed",
        ["experiment", "--seeds", "2", "--verdicts", "true"],
        "--verdicts true needs --seeds >= 3",
    ),
    (
        "report-neither-tables-nor-run",
        ["report"],
        "give either --tables FOLDER or --run-id ID --out FOLDER",
    ),
    (
        "report-tables-not-a-folder",
        ["report", "--tables", "{tmp}/no-such-folder"],
        "no-such-folder: no such folder",
    ),
    ("report-margin-not-a-number", ["report", "--margins", "pgd40=x"], "expected metric=number"),
    (
        "experiment-pool-set-unknown",
        ["experiment", "--inv-sets", "thesis_linf_eps0.3,mnist_c"],
        "unknown invariance set(s) ['mnist_c'] in the pool",
    ),
]

# Entry points being built elsewhere: add their cases here (same shape) when they land.
_TUNE = ["tune", "--budget", "smoke", "--storage", "sqlite:///{tmp}/optuna.db"]
TUNE_CASES = [
    ("tune-n-trials-zero", [*_TUNE, "--n-trials", "0"], "n_trials must be >= 1"),
    ("tune-timeout-zero", [*_TUNE, "--timeout", "0"], "timeout must be > 0"),
    ("tune-clean-floor-above-one", [*_TUNE, "--clean-floor", "1.5"], "clean_floor must lie in"),
    ("tune-objective-unknown", [*_TUNE, "--objective", "hypervolume"], "unknown objective"),
    ("tune-sampler-unknown", [*_TUNE, "--sampler", "cmaes"], "unknown sampler"),
    ("tune-precision-unknown", [*_TUNE, "--precision", "bf16"], "precision must be one of"),
    ("tune-storage-bad-url", ["tune", "--storage", "nosuchdb://x/y"], "cannot open the study"),
    ("tune-flag-yes", [*_TUNE, "--tune-lr", "yes"], "expected true/false, got 'yes'"),
    ("tune-beta-without-trades", [*_TUNE, "--tune-beta", "true"], "pass method=trades"),
    (
        "tune-trades-beta-negative",
        [*_TUNE, "--method", "trades", "--trades-beta", "-1"],
        "trades_beta must be >= 0",
    ),
]
SECRET_URL = "postgresql+psycopg://robustlab:s3cret@127.0.0.1:1/optuna"  # never printed
SECRET_CASES = [
    (
        f"{command}-storage-password",
        [command, *extra, "--storage", SECRET_URL],
        "carries a password",
    )
    for command, extra in (
        ("tune", ["--budget", "smoke"]),
        ("tune-worker", ["--study-name", "s"]),
        ("experiment", ["--budget", "smoke"]),
        ("experiment-worker", ["--study-name", "s"]),
        ("register", ["--study-name", "s"]),
    )
] + [
    (
        "services-env-missing",
        ["ENV:ROBUSTLAB_SERVICES_ENV={tmp}/nosuch.env", *_TUNE],
        "nosuch.env: no such file",
    ),
    (
        "services-env-world-readable",
        ["ENV:ROBUSTLAB_SERVICES_ENV={tmp}/open.env", *_TUNE],
        "is readable by other users (mode 644)",
    ),
    (
        "services-env-malformed",
        ["ENV:ROBUSTLAB_SERVICES_ENV={tmp}/bad.env", *_TUNE],
        "line 2 is not KEY=VALUE",
    ),
    (
        "services-password-unreadable",
        ["ENV:ROBUSTLAB_TRACKING_DIR={tmp}/pwdir", "services", "start"],
        "cannot read the PostgreSQL password",
    ),
    (
        "evaluate-flag-maybe",
        ["evaluate", "--model-uri", NO_RUN, "--allow-unknown-provenance", "maybe"],
        "expected true/false, got 'maybe'",
    ),
]
REGISTER_CASES = [
    ("register-no-source", ["register"], "pass exactly one of study_name"),
    (
        "register-two-sources",
        ["register", "--study-name", "a", "--experiment-run-id", "b"],
        "pass exactly one of study_name",
    ),
    (
        "register-no-storage",
        ["register", "--study-name", "s", "--storage", "sqlite:///{tmp}/none.db"],
        "no Optuna storage at",
    ),
    (
        "register-unknown-model",
        ["register", "--model-uri", "models:/no_such_model@champion"],
        "not found",
    ),
    (
        "register-unknown-run-name",
        ["register", "--run-name", "champion"],
        "--run-name champion: no run of that name in",
    ),
    (
        "register-run-name-and-model",
        ["register", "--run-name", "champion", "--model-uri", "runs:/abc/model"],
        "pass exactly one of study_name, experiment_run_id, model_uri, run_name or from (got 2)",
    ),
]

CASES = (
    TRAINING_CASES
    + EVALUATE_CASES
    + GENERATE_CASES
    + LABEL_CASES
    + EXPERIMENT_CASES
    + TUNE_CASES
    + REGISTER_CASES
    + SECRET_CASES
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A shared SQLite store, a vanilla run without checkpoint, a label store, a busy port."""
    from robustlab.data import labels as L

    root = tmp_path_factory.mktemp("bad-input")
    folder = root / "tracking"
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("robustlab", artifact_location=(folder / "art").as_uri())
    vanilla = client.create_run(exp, tags={"robustlab.regime": "vanilla"})
    client.set_terminated(vanilla.info.run_id, "FAILED")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "mnist.npz").write_bytes(b"\x00garbage")
    L.import_thesis(root / "store.json").save()
    for name, text, mode in (
        ("open.env", "ROBUSTLAB_OPTUNA_STORAGE=sqlite:///x.db\n", 0o644),
        ("bad.env", "MLFLOW_TRACKING_URI=http://127.0.0.1:1\nthis line is no assignment\n", 0o600),
    ):
        (root / name).write_text(text)
        (root / name).chmod(mode)
    (root / "pwdir" / "services" / "pg_password").mkdir(parents=True)  # a folder: unreadable
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "ROBUSTLAB_TRACKING_DIR": str(folder),
        "MLFLOW_EXPERIMENT_NAME": "robustlab",
    }
    env.pop("MLFLOW_RUN_ID", None)
    values = {
        "store": str(root / "store.json"),
        "new_store": str(root / "new.json"),
        "vanilla_run": vanilla.info.run_id,
        "busy_port": str(busy.getsockname()[1]),
        "tmp": str(root),
        "corrupt": str(root / "corrupt"),
    }
    yield {"uri": uri, "env": env, "values": values, "root": root}
    busy.close()


def count_runs(uri: str) -> int:
    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return len(client.search_runs(exps, run_view_type=ViewType.ALL, max_results=10_000))


def error_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's unconditional start-up lines."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not NOISE.match(ln)]


def test_matrix_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("args", "message"), [pytest.param(a, m, id=i) for i, a, m in CASES])
def test_bad_input(store, args, message):
    argv = [a.format(**store["values"]) for a in args]
    env = dict(store["env"])
    while argv[0].startswith("ENV:"):
        key, value = argv.pop(0).removeprefix("ENV:").split("=", 1)
        env[key] = value
    before = count_runs(store["uri"])
    t0 = time.perf_counter()
    out = subprocess.run(
        [str(BIN / "robustlab"), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=store["root"],
        timeout=300,
    )
    lines = error_lines(out.stderr)
    assert "s3cret" not in out.stderr + out.stdout  # a password is never printed
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith(f"robustlab {argv[0]}: error: "), lines[0]
    assert message in lines[0], lines[0]
    assert count_runs(store["uri"]) == before, "a rejected call created a run"
    print(f"{time.perf_counter() - t0:.1f}s {lines[0]}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("param", "line"),
    [
        # rejected by argparse
        ("robust_eval=maybe", "argument --robust-eval: expected true/false, got 'maybe'"),
        # rejected by our own checks
        ("seed=-1", "seed must lie in [0, 2**32 - 1], got -1"),
    ],
)
def test_bad_input_through_mlflow_run_fails_the_run_with_the_error(store, param, line):
    """`mlflow run` creates the run before our command starts: it must end FAILED, with the one
    error line recorded on it as the tag robustlab.error."""
    before = count_runs(store["uri"])
    out = subprocess.run(
        [
            str(BIN / "mlflow"),
            "run",
            str(REPO),
            "-e",
            "vanilla",
            "--env-manager",
            "local",
            "--experiment-name",
            "robustlab",
            "-P",
            param,
        ],
        capture_output=True,
        text=True,
        env={**store["env"], "PATH": f"{BIN}:{os.environ['PATH']}"},
        cwd=store["root"],
        timeout=300,
    )
    assert out.returncode != 0
    assert f"robustlab vanilla: error: {line}" in out.stderr
    client = MlflowClient(tracking_uri=store["uri"])
    runs = client.search_runs(
        [client.get_experiment_by_name("robustlab").experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert count_runs(store["uri"]) == before + 1
    run = runs[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["robustlab.error"].startswith(f"robustlab vanilla: error: {line}")


@pytest.mark.slow
def test_a_password_passed_as_an_mlflow_run_parameter_leaves_no_run_that_shows_it(store):
    """`mlflow run -P storage=URL-with-password` logs the URL as a parameter before our command
    starts; the command refuses it in one line and purges the run that shows it."""
    before = count_runs(store["uri"])
    cmd = [str(BIN / "mlflow"), "run", str(REPO), "-e", "tune", "--env-manager", "local"]
    cmd += ["--experiment-name", "robustlab", "-P", f"storage={SECRET_URL}", "-P", "budget=smoke"]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**store["env"], "PATH": f"{BIN}:{os.environ['PATH']}"},
        cwd=store["root"],
        timeout=300,
    )
    assert out.returncode != 0
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("robustlab tune: error: "))
    assert "carries a password" in line and "ROBUSTLAB_OPTUNA_STORAGE" in line and "purged" in line
    assert "s3cret" not in line
    assert count_runs(store["uri"]) == before  # not even a deleted run keeps the parameter


def test_unreachable_tracking_server_leaves_nothing_behind(tmp_path):
    """The server is down when a run starts: one line, exit 2, and nothing written locally."""
    work, tracking = tmp_path / "cwd", tmp_path / "tracking"
    work.mkdir()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "ROBUSTLAB_TRACKING_DIR": str(tracking),
    }
    env.pop("MLFLOW_RUN_ID", None)
    out = subprocess.run(
        [str(BIN / "robustlab"), "vanilla", "--epochs", "1", "--train-size", "256"],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=120,
    )
    lines = error_lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1 and "is unreachable" in lines[0], out.stderr
    assert "start the server" in lines[0]
    assert not tracking.exists() and list(work.iterdir()) == []
