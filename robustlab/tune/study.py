"""`tune` on the launcher: the study, its parent run, workers, the summary on the parent.

`run_tune` validates everything, then either leads the study (creates or resumes it and its
parent run, runs the workers: in this process when `workers=1`, else as `robustlab tune-worker`
subprocesses, each its own TensorFlow) or, when another `robustlab tune` on the same study is
alive, joins it as one more worker. Workers read the configuration and the MLflow parent run /
experiment ids from the study's attributes, so a worker on another machine joins with
`robustlab tune-worker --study-name …` (the storage URL from $ROBUSTLAB_OPTUNA_STORAGE).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import mlflow
import optuna

from robustlab.config import TuneConfig
from robustlab.errors import ConfigError
from robustlab.launch.launcher import (
    announce,
    check_existing,
    drive,
    elect,
    open_study,
    parent_run,
    wait_for_leader,
    wait_for_running,
    work,
    worker_command,
    worker_env,
)
from robustlab.launch.storage import open_storage, storage_url
from robustlab.tracking import configure_tracking
from robustlab.tune.objective import TunePlan, stored_config


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


def run_tune(cfg: TuneConfig, create_only: bool = False) -> str:
    """Lead (or join) the study, run its workers, summarize it on the parent run; its run id.

    `create_only`: create (or check) the study and its parent run, run no trial and no summary;
    workers on any machine then join with `robustlab tune-worker`, and running `tune` again
    with the same arguments summarizes (and finishes the study if trials are missing)."""
    cfg.validate()
    make_sampler(cfg)  # refuses gp without torch
    url = storage_url(cfg.storage)
    storage = open_storage(url)
    plan = TunePlan(cfg)
    old = check_existing(storage, plan)
    from robustlab.data.selection import split_record

    split = split_record(cfg.data_dir)  # checks the data before any run exists
    configure_tracking()  # a tracking store that cannot be used: refused before any study
    study, token = elect(storage, plan)
    if token is None:
        return _join(study, storage, cfg, url)
    params = {f"tune_{k}": v for k, v in stored_config(cfg).items() if k != "storage"}
    params["tune_study_name"] = cfg.name
    tags = {"robustlab.kind": "tune", "robustlab.study": cfg.name}
    if old is not None:
        tags["robustlab.resumed_study"] = "true"
    if create_only:
        tags["robustlab.tune.create_only"] = "true"
    with parent_run(
        plan,
        storage,
        url,
        study=study,
        token=token,
        run_name=f"tune-{cfg.name}",
        params=params,
        tags=tags,
    ) as (parent, study):
        mlflow.log_dict(split, "selection_split.json")
        announce(study, parent)
        if create_only:
            return parent.info.run_id
        t0 = time.perf_counter()
        if cfg.workers == 1 and not cfg.threads and not cfg.pin_cpus:
            run_worker(cfg.name, url, 0, cfg.timeout)
        else:
            _spawn_workers(study, plan, url)
        wait_for_running(study, plan.heartbeat)  # trials of joined workers finish first
        mlflow.log_metric("tune/wall_seconds", time.perf_counter() - t0)
        from robustlab.tune.plots import summarize

        summarize(optuna.load_study(study_name=cfg.name, storage=storage), cfg)
        return parent.info.run_id


def _join(study: optuna.Study, storage, cfg: TuneConfig, url: str) -> str:
    """Another `robustlab tune` leads this study: work as one of its workers, then exit."""
    parent = wait_for_leader(study, storage)
    print(
        f"tune: study {cfg.name} is led by another robustlab tune (parent run {parent}); "
        "joining it as a worker",
        file=sys.stderr,
        flush=True,
    )
    done = run_worker(cfg.name, url, 1 + secrets.randbelow(999_999), cfg.timeout)
    print(
        f"tune: this worker ran {done} trial(s) of study {cfg.name}; the leading process "
        f"summarizes it on parent run {parent}",
        file=sys.stderr,
    )
    return parent


def _spawn_workers(study: optuna.Study, plan: TunePlan, url: str) -> None:
    cfg = plan.cfg
    extra = {}
    if cfg.threads:
        for key in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
            extra[key] = str(cfg.threads)
    env = worker_env(url, extra)
    ncpu = os.cpu_count() or 1
    args = ["--timeout", str(cfg.timeout)] if cfg.timeout is not None else []

    def spawn(i: int) -> subprocess.Popen:
        cmd = worker_command("tune-worker", cfg.name, "--worker-index", str(i), *args)
        if cfg.pin_cpus:
            cmd = ["taskset", "-c", str(i % ncpu), *cmd]
        return subprocess.Popen(cmd, env=env)

    deadline = time.monotonic() + cfg.timeout if cfg.timeout is not None else None
    drive(
        study,
        plan,
        spawn,
        workers=cfg.workers,
        demand=plan.demand,
        max_failures=2 * cfg.n_trials,
        deadline=deadline,
    )


def load_plan(study_name: str, url: str) -> TunePlan:
    """The TunePlan a worker runs, from the study's attributes; ConfigError for an unknown or a
    non-tune study."""
    study = open_study(url, study_name, "start it with robustlab tune")
    return TunePlan.from_study(study, url)


def run_worker(study_name: str, url: str, worker: int = 0, timeout: float | None = None) -> int:
    """Run trials until the study holds n_trials COMPLETE trials or `timeout` seconds (this
    worker's own limit) have passed; the number of trials this worker ran."""
    plan = load_plan(study_name, url)
    cfg = plan.cfg
    os.environ.pop("MLFLOW_RUN_ID", None)  # it would override the trial runs' parent_run_id
    configure_tracking()
    if cfg.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
        tf.config.threading.set_inter_op_parallelism_threads(cfg.threads)
    study = optuna.load_study(
        study_name=study_name,
        storage=open_storage(url, plan.heartbeat),
        sampler=make_sampler(cfg, worker),
        pruner=make_pruner(cfg),
    )
    return work(study, plan, timeout=timeout)
