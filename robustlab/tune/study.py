"""The study: storage, one parent MLflow run, N worker processes, the summary on the parent.

`run_tune` validates everything, creates (or resumes) the study and its parent run once, then
runs the workers: in this process when `workers=1`, else as `robustlab tune-worker`
subprocesses (each its own TensorFlow). Workers read the configuration and the MLflow parent
run / experiment ids from the study's user attributes, so a worker on another machine joins
with `robustlab tune-worker --study-name … --storage …`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict

import mlflow
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from robustlab.config import TuneConfig
from robustlab.errors import ConfigError
from robustlab.tracking import start_run, tracking_dir

STORAGE_ENV = "ROBUSTLAB_OPTUNA_STORAGE"
DIRECTIONS = {"pareto": ["maximize"] * 3, "scalar": ["maximize"]}
METRIC_NAMES = {
    "pareto": ["sel/clean_acc", "sel/pgd_acc", "sel/inv_bal_acc"],
    "scalar": ["sel/score"],
}
ATTR_PARENT = "mlflow_parent_run_id"
ATTR_EXPERIMENT = "mlflow_experiment_id"
ATTR_CONFIG = "robustlab_config"
# a resumed study must keep these (its trials must stay comparable)
FIXED_KEYS = ("objective", "budget", "clean_floor", "eps", "seed", "tune_lr", "tune_warmup")

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(cfg: TuneConfig) -> str:
    """`storage`, else $ROBUSTLAB_OPTUNA_STORAGE, else SQLite `tracking/optuna.db`."""
    if cfg.storage:
        return cfg.storage
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV]
    folder = tracking_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def open_storage(url: str, cfg: TuneConfig | None = None) -> RDBStorage:
    """An RDB storage (heartbeats when `cfg` is given); ConfigError when it cannot be opened."""
    engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None
    heartbeat = {}
    if cfg is not None:
        heartbeat = {
            "heartbeat_interval": cfg.heartbeat_interval,
            "grace_period": cfg.grace_period,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                max_retry=cfg.max_retry
            ),
        }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/Optuna raise many types for a bad URL
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"cannot open the study storage {url!r} ({msg}); pass an RDB URL such as "
            "sqlite:////abs/path/optuna.db or postgresql://user@host/db"
        ) from None


def make_sampler(cfg: TuneConfig, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler for one worker (seeded per worker so workers do not propose the same points)."""
    seed = cfg.seed * 1000 + worker
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if cfg.sampler == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    check_gp_available()
    return optuna.samplers.GPSampler(seed=seed)


def check_gp_available() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError(
            "sampler=gp needs PyTorch (CPU), which is not installed; "
            "choose sampler=tpe, nsgaii or random (or pip install torch)"
        ) from None


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    from robustlab.tune.space import BUDGETS

    b = BUDGETS[cfg.budget]
    if cfg.objective != "scalar" or cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(b.epochs, 1))
    return optuna.pruners.MedianPruner(
        n_startup_trials=b.prune_startup, n_warmup_steps=b.prune_warmup
    )


def existing_study(storage: RDBStorage, cfg: TuneConfig) -> optuna.Study | None:
    """The study named `cfg.name` when it exists; ConfigError when it cannot be resumed as `cfg`."""
    names = {s.study_name for s in storage.get_all_studies()}
    if cfg.name not in names:
        return None
    study = optuna.load_study(study_name=cfg.name, storage=storage)
    wanted = [optuna.study.StudyDirection.MAXIMIZE] * len(DIRECTIONS[cfg.objective])
    old = json.loads(study.user_attrs.get(ATTR_CONFIG, "{}"))
    if list(study.directions) != wanted:
        raise ConfigError(
            f"study {cfg.name!r} exists with {len(study.directions)} objective(s), not "
            f"objective={cfg.objective} ({len(wanted)}); choose another study_name"
        )
    changed = [k for k in FIXED_KEYS if k in old and old[k] != asdict(cfg)[k]]
    if changed:
        was = ", ".join(f"{k}={old[k]}" for k in changed)
        raise ConfigError(
            f"study {cfg.name!r} exists with {was}; resume it with the same values "
            "or choose another study_name"
        )
    return study


def run_tune(cfg: TuneConfig) -> str:
    """Create or resume the study, run its workers, summarize it on the parent run; its run id."""
    cfg.validate()
    make_sampler(cfg)  # refuses gp without torch
    url = storage_url(cfg)
    storage = open_storage(url)
    old = existing_study(storage, cfg)
    from robustlab.invariance.selection import split_record

    split = split_record(cfg.data_dir)  # checks the data before any run exists
    params = {f"tune_{k}": v for k, v in asdict(cfg).items() if k not in ("storage",)}
    params["tune_study_name"] = cfg.name
    tags = {"robustlab.kind": "tune", "robustlab.study": cfg.name}
    if old is not None:
        tags["robustlab.resumed_study"] = "true"
    with start_run(f"tune-{cfg.name}", params=params, tags=tags) as parent:
        parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
        study = optuna.create_study(
            study_name=cfg.name,
            storage=storage,
            directions=DIRECTIONS[cfg.objective],
            load_if_exists=True,
        )
        study.set_metric_names(METRIC_NAMES[cfg.objective])
        for key, value in {
            ATTR_PARENT: parent_id,
            ATTR_EXPERIMENT: experiment_id,
            "objective": cfg.objective,
            "clean_floor": cfg.clean_floor,
            ATTR_CONFIG: json.dumps(asdict(cfg)),
        }.items():
            study.set_user_attr(key, value)
        if old is not None:
            _adopt_trial_runs(study, parent_id)
        mlflow.log_dict(split, "selection_split.json")
        mlflow.set_tag("robustlab.optuna_storage", _redact(url))
        t0 = time.perf_counter()
        if cfg.workers == 1 and not cfg.threads and not cfg.pin_cpus:
            run_worker(cfg.name, url, 0, cfg.timeout)
        else:
            _spawn_workers(cfg, url)
        mlflow.log_metric("tune/wall_seconds", time.perf_counter() - t0)
        from robustlab.tune.plots import summarize

        summarize(optuna.load_study(study_name=cfg.name, storage=storage), cfg)
        return parent_id


def _redact(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}@{host}"
    return url


def _adopt_trial_runs(study: optuna.Study, parent_id: str) -> None:
    """A resumed study: move its earlier trial runs under the new parent run."""
    client = mlflow.tracking.MlflowClient()
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            client.set_tag(run_id, "mlflow.parentRunId", parent_id)


def _spawn_workers(cfg: TuneConfig, url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    if cfg.threads:
        for key in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
            env[key] = str(cfg.threads)
    ncpu = os.cpu_count() or 1
    procs = []
    for i in range(cfg.workers):
        cmd = [sys.executable, "-m", "robustlab.cli", "tune-worker"]
        cmd += ["--study-name", cfg.name, "--storage", url, "--worker-index", str(i)]
        if cfg.timeout is not None:
            cmd += ["--timeout", str(cfg.timeout)]
        if cfg.pin_cpus:
            cmd = ["taskset", "-c", str(i % ncpu), *cmd]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    bad = [i for i, c in enumerate(codes) if c != 0]
    if bad:
        print(
            f"note: tune workers {bad} exited with codes {[codes[i] for i in bad]}; "
            "their trials are retried by the next worker (heartbeat) or marked FAIL",
            file=sys.stderr,
        )


def load_context(study_name: str, url: str):
    """The StudyContext a worker needs, from the study's user attributes."""
    from robustlab.tune.objective import StudyContext

    storage = open_storage(url)
    names = {s.study_name for s in storage.get_all_studies()}
    if study_name not in names:
        raise ConfigError(
            f"no study {study_name!r} in {_redact(url)}; start it with robustlab tune"
        )
    attrs = optuna.load_study(study_name=study_name, storage=storage).user_attrs
    if ATTR_PARENT not in attrs or ATTR_CONFIG not in attrs:
        raise ConfigError(f"study {study_name!r} was not created by robustlab tune")
    cfg = TuneConfig(**json.loads(attrs[ATTR_CONFIG]))
    return StudyContext(cfg, study_name, attrs[ATTR_PARENT], attrs[ATTR_EXPERIMENT])


def run_worker(study_name: str, url: str, worker: int = 0, timeout: float | None = None) -> None:
    """Optimize the study until it holds n_trials COMPLETE trials or `timeout` seconds (this
    worker's own limit) have passed."""
    ctx = load_context(study_name, url)
    cfg = ctx.cfg
    os.environ.pop("MLFLOW_RUN_ID", None)  # it would override the trial runs' parent_run_id
    if cfg.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
        tf.config.threading.set_inter_op_parallelism_threads(cfg.threads)
    from robustlab.tune.objective import Objective

    study = optuna.load_study(
        study_name=study_name,
        storage=open_storage(url, cfg),
        sampler=make_sampler(cfg, worker),
        pruner=make_pruner(cfg),
    )
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done >= cfg.n_trials:
        return
    objective = Objective(ctx)
    study.optimize(
        objective,
        n_trials=None,
        timeout=timeout,
        callbacks=[MaxTrialsCallback(cfg.n_trials, states=(TrialState.COMPLETE,))],
        catch=(),
        gc_after_trial=True,
    )
