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
from dataclasses import dataclass, field

import mlflow
import optuna

from robustlab.config import TuneConfig
from robustlab.launch.leader import Workers, lead, random_worker_index
from robustlab.launch.leader import run_worker as launch_worker
from robustlab.launch.optuna_compat import storage_of
from robustlab.launch.storage import storage_url
from robustlab.tune.plan import TunePlan, stored_config
from robustlab.tune.samplers import make_sampler
from robustlab.tune.summary import summarize


def run_tune(cfg: TuneConfig, create_only: bool = False) -> str:
    """Lead (or join) the study, run its workers, summarize it on the parent run; its run id.

    `create_only`: create (or check) the study and its parent run, run no trial and no summary;
    workers on any machine then join with `robustlab tune-worker`, and running `tune` again
    with the same arguments summarizes (and finishes the study if trials are missing)."""
    cfg.validate()
    make_sampler(cfg)  # refuses gp without torch
    url = storage_url(cfg.storage)
    plan = LeadingTunePlan(cfg, create_only=create_only)
    extra = {}
    if cfg.threads:
        for key in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
            extra[key] = str(cfg.threads)
    ncpu = os.cpu_count() or 1
    args = ["--timeout", str(cfg.timeout)] if cfg.timeout is not None else []
    workers = Workers(
        count=cfg.workers,
        command="tune-worker",
        args=lambda i: ["--worker-index", str(i), *args],
        join=lambda name: run_worker(name, url, random_worker_index(), cfg.timeout),
        max_failures=2 * cfg.n_trials,
        here=None
        if cfg.threads or cfg.pin_cpus
        else lambda: run_worker(cfg.name, url, 0, cfg.timeout),
        env=extra,
        deadline_s=cfg.timeout,
        wrap=(lambda i, cmd: ["taskset", "-c", str(i % ncpu), *cmd])
        if cfg.pin_cpus
        else (lambda _i, cmd: cmd),
    )
    return lead(plan, url, workers, create_only)


@dataclass
class LeadingTunePlan(TunePlan):
    """The tune plan as its leader runs it (`create_only` tags the parent run)."""

    create_only: bool = False
    split: dict | None = field(default=None, init=False)

    def check(self, existing: optuna.Study | None) -> None:
        from robustlab.data.tramer_halves import split_record

        self.split = split_record(self.cfg.data_dir)  # checks the data before any run exists

    def parent(self, resumed: bool) -> tuple[str, dict, dict[str, str]]:
        cfg = self.cfg
        params = {f"tune_{k}": v for k, v in stored_config(cfg).items() if k != "storage"}
        params["tune_study_name"] = cfg.name
        tags = {"robustlab.kind": "tune", "robustlab.study": cfg.name}
        if resumed:
            tags["robustlab.resumed_study"] = "true"
        if self.create_only:
            tags["robustlab.tune.create_only"] = "true"
        return f"tune-{cfg.name}", params, tags

    def prepare(self, study: optuna.Study, parent) -> None:
        mlflow.log_dict(self.split, "selection_split.json")

    def created(self, parent_id: str) -> None:
        pass  # the command says it

    def summarize(self, study: optuna.Study, parent_id: str, wall: float) -> None:
        mlflow.log_metric("tune/wall_seconds", wall)
        summarize(
            optuna.load_study(study_name=study.study_name, storage=storage_of(study)), self.cfg
        )


def run_worker(study_name: str, url: str, worker: int = 0, timeout: float | None = None) -> int:
    """Run trials until the study holds n_trials COMPLETE trials or `timeout` seconds (this
    worker's own limit) have passed; the number of trials this worker ran."""
    return launch_worker(
        study_name,
        url,
        lambda study: TunePlan.from_study(study, url, worker),
        "start it with robustlab tune",
        timeout=timeout,
    )
