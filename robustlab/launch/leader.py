"""The one leader script of `tune` and `experiment`, and the one worker entry.

`lead`: storage → an existing study checked → the plan's own checks → election (a live leader:
join it as a worker; a dead one: its parent run ended FAILED and the study taken over) → the
parent run → the plan prepares the study → `announce` → (create-only: stop) → workers → the
plan's summary. `run_worker`: the study → the plan from its attributes → trials until done.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from mlflow.entities import Run

from robustlab.launch.election import is_fresh, leader_record
from robustlab.launch.launcher import (
    Plan,
    announce,
    check_existing,
    drive,
    elect,
    join_wait,
    open_study,
    parent_run,
    wait_for_leader,
    wait_for_running,
    work,
    worker_command,
    worker_env,
)
from robustlab.launch.progress import Progress
from robustlab.launch.storage import open_storage
from robustlab.tracking import configure_tracking


class LeadPlan(Plan, Protocol):
    """What a leader needs beyond a worker's plan."""

    def check(self, existing: optuna.Study | None) -> None:
        """Every check before any run or study is written (may configure tracking and print
        what the leader will do)."""

    def parent(self, resumed: bool) -> tuple[str, dict[str, Any], dict[str, str]]:
        """The parent run's (name, params, tags)."""

    def prepare(self, study: optuna.Study, parent: Run) -> None:
        """Log the set-up on the parent run and prepare the study before workers see it."""

    def created(self, parent_id: str) -> None:
        """Say what to do next after `--create-only`."""

    def summarize(self, study: optuna.Study, parent_id: str, wall: float) -> None:
        """Every trial is done: write the summary on the parent run."""


@dataclass(frozen=True)
class Workers:
    """How the leader gets trials run: `count` processes (`worker` i's extra arguments), or,
    when `here` is given and `count` is 1, in this process."""

    count: int
    command: str  # tune-worker | experiment-worker
    args: Callable[[int], Sequence[str]]  # worker i's arguments after --study-name
    join: Callable[[str], int]  # this process as one more worker of study `name`
    max_failures: int
    here: Callable[[], int] | None = None
    env: dict[str, str] = field(default_factory=dict)
    deadline_s: float | None = None
    wrap: Callable[[int, list[str]], list[str]] = lambda _i, cmd: cmd


def lead(plan: LeadPlan, url: str, workers: Workers, create_only: bool = False) -> str:
    """Lead (or join) the plan's study; the parent run id (the leader's, for a joiner)."""
    storage = open_storage(url, plan.heartbeat)
    old = check_existing(storage, plan) if plan.study_name else None
    plan.check(old)
    configure_tracking()  # a tracking store that cannot be used: refused before any study
    study, lease = None, None
    while plan.study_name:
        study, lease = elect(storage, plan)
        if lease is not None:
            break
        parent_id = wait_for_leader(study, storage, plan.heartbeat)
        if parent_id is None:
            continue  # that leader died meanwhile: elect again
        _join(plan, workers, parent_id)
        if not leader_died(study, parent_id, plan.heartbeat):
            return parent_id
        print(
            f"{plan.kind}: the leader of study {plan.study_name} died while this process worked "
            f"(parent run {parent_id} still RUNNING, its lease stale); taking over",
            file=sys.stderr,
            flush=True,
        )
    name, params, tags = plan.parent(old is not None)
    with parent_run(
        plan, storage, url, study=study, lease=lease, run_name=name, params=params, tags=tags
    ) as (parent, study, lease):
        plan.prepare(study, parent)
        announce(study, parent, lease)
        if create_only:
            plan.created(parent.info.run_id)
            return parent.info.run_id
        t0 = time.perf_counter()
        progress = Progress(plan.kind, parent.info.run_id, plan.tally)
        if workers.here is not None and workers.count == 1:
            workers.here()
        else:
            _spawn(study, plan, url, workers, lease, progress)
        wait_for_running(study, plan, lease, progress)  # trials of joined workers finish first
        plan.summarize(study, parent.info.run_id, time.perf_counter() - t0)
        return parent.info.run_id


def leader_died(study: optuna.Study, parent_id: str, heartbeat) -> bool:
    """After a joiner's work: wait until the leader ends its parent run (False: it lives and
    summarizes) or its lease goes stale while the parent is still RUNNING (True: a joiner that
    came within the grace period of the leader's death takes over); False after the join wait."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    deadline = time.monotonic() + join_wait(heartbeat)
    while time.monotonic() < deadline:
        try:
            if client.get_run(parent_id).info.status != "RUNNING":
                return False
        except MlflowException:
            return False
        if not is_fresh(leader_record(study), heartbeat):
            return True
        time.sleep(2.0)
    return False


def _join(plan: LeadPlan, workers: Workers, parent_id: str) -> str:
    """Another process leads the study: work as one of its workers, then exit."""
    kind, name = plan.kind, plan.study_name
    print(
        f"{kind}: study {name} is led by another robustlab {kind} (parent run {parent_id}); "
        "joining it as a worker",
        file=sys.stderr,
        flush=True,
    )
    done = workers.join(name)
    print(
        f"{kind}: this worker ran {done} trial(s) of study {name}; the leading process "
        f"summarizes it on parent run {parent_id}",
        file=sys.stderr,
    )
    return parent_id


def _spawn(
    study: optuna.Study, plan: LeadPlan, url: str, workers: Workers, lease, progress: Progress
) -> None:
    env = worker_env(url, workers.env)

    def spawn(i: int) -> subprocess.Popen:
        cmd = worker_command(workers.command, plan.study_name, *workers.args(i))
        return subprocess.Popen(workers.wrap(i, cmd), env=env)

    deadline = None if workers.deadline_s is None else time.monotonic() + workers.deadline_s
    drive(
        study,
        plan,
        spawn,
        workers=workers.count,
        demand=plan.demand,
        max_failures=workers.max_failures,
        deadline=deadline,
        lease=lease,
        progress=progress,
    )


def random_worker_index() -> int:
    """A worker index for a worker started outside the leader (seeds its sampler)."""
    return 1 + secrets.randbelow(999_999)


def run_worker(
    study_name: str,
    url: str,
    load: Callable[[optuna.Study], Plan],
    hint: str,
    *,
    max_trials: int = 0,
    timeout: float | None = None,
) -> int:
    """Run the study's trials in this process until its plan is done (or `max_trials` trials or
    `timeout` seconds); the number run. `load` builds the plan from the study's attributes."""
    plan = load(open_study(url, study_name, hint))
    os.environ.pop("MLFLOW_RUN_ID", None)  # it would override the trial runs' parent_run_id
    configure_tracking()
    options = plan.worker_setup()
    storage = open_storage(url, plan.heartbeat)
    study = optuna.load_study(study_name=study_name, storage=storage, **options)
    return work(study, plan, max_trials=max_trials, timeout=timeout, after_trial=plan.after_trial)
