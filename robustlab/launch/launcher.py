"""The one launcher for child runs on an Optuna study; `tune` and `experiment` are plans fed to it.

A plan (`Plan`) says what its study is (kind, directions, the attributes every worker reads),
which trial a worker takes next and how a trial trains one child MLflow run. The launcher does
the rest, the same way for every plan:

- `elect`: check an existing study of that name runs the same plan (else one line), then decide
  whether this process *leads* (creates the parent run and summarizes) or *joins* a leader that
  is alive (its beat on the study is fresh): any number of identical commands started at once
  end with one leader and the others working as its workers;
- `parent_run`: the leader's parent MLflow run, the study's attributes (kind, parent run,
  experiment, the plan), adoption of an earlier parent's finished runs, and the leader's beat;
- `work`: the one worker loop (heartbeat, retry of a dead worker's trial with its parameters,
  resume of the lost run from an intact checkpoint, PRUNED/FAIL/COMPLETE);
- `drive`: keeps N `robustlab <plan>-worker` processes busy (connection URLs only in their
  environment, never on a command line) until the plan is done;
- readers: `complete_runs`, `finished_children`, `end_lost_runs`, `checkpointed_run`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlflow
import optuna
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from robustlab.errors import ConfigError, RobustlabError
from robustlab.launch import optuna_compat
from robustlab.launch.election import Lease, claim, is_fresh, leader_record
from robustlab.launch.storage import (
    STORAGE_ENV,
    Heartbeat,
    last_outage,
    load_existing,
    open_storage,
    redact_url,
    with_db_retry,
)
from robustlab.tracking import start_run

ATTR_KIND = "robustlab_kind"  # "tune" | "experiment"
ATTR_PARENT = "mlflow_parent_run_id"
ATTR_EXPERIMENT = "mlflow_experiment_id"
ATTR_PARENT_TOKEN = "robustlab_parent_leader"  # the lease token of the parent run's leader
LEADER_LOST_TAG = "robustlab.leader_lost"  # on a parent run whose leader died
DEAD_LEADER_REASON = (
    "its leading process stopped beating for longer than the grace period (it died or lost the "
    "database); a new leader took over the study"
)
RUN_ATTR = "mlflow_run_id"  # a trial's child run
FAIL_REASON = "robustlab_fail_reason"  # on a trial that failed; study attr `<this>_<n>` if stale
LOST_TAG = "robustlab.trial_lost"  # on the run of a trial declared lost while it still ran
JOIN_WAIT_S = 120.0  # how long a joiner waits for the leader's parent run


class Plan(Protocol):
    """What the launcher needs from `tune` or `experiment`."""

    kind: str
    study_name: str
    directions: Sequence[str]
    metric_names: Sequence[str]
    heartbeat: Heartbeat

    def study_attrs(self) -> dict[str, Any]:
        """The attributes every worker reads (JSON-able values)."""

    def incompatibility(self, study: optuna.Study) -> str | None:
        """Why an existing study of this name cannot be continued by this plan (None: it can)."""

    def next_trial(self, study: optuna.Study) -> optuna.Trial | None:
        """The trial a worker runs next (None: nothing left for it)."""

    def done(self, study: optuna.Study) -> bool:
        """Whether the study needs no further trial."""

    def tally(self, study: optuna.Study) -> tuple[int, int]:
        """(units complete, units planned): what the leader's progress shows."""

    def run_trial(self, trial: optuna.Trial, retry: Retry | None) -> float | Sequence[float] | None:
        """Train the trial's child run; its objective value(s), or None to end it FAIL unrun."""

    def demand(self, study: optuna.Study) -> int:
        """How many more workers the study can use now."""

    def worker_setup(self) -> dict[str, Any]:
        """Prepare this process to run trials; keyword arguments for `optuna.load_study`
        (sampler, pruner)."""

    def after_trial(self) -> None:
        """Release what one trial left behind in a worker process."""


def parent_ids(study: optuna.Study) -> tuple[str, str] | None:
    """(parent run id, experiment id) the study's leader published, or None."""
    attrs = study.user_attrs
    if ATTR_PARENT not in attrs or ATTR_EXPERIMENT not in attrs:
        return None
    return attrs[ATTR_PARENT], attrs[ATTR_EXPERIMENT]


@dataclass(frozen=True)
class Retry:
    """A trial that re-runs the parameters of a trial whose worker died."""

    of: int  # the lost trial's number
    resume_run_id: str | None  # the lost run, when it left an intact checkpoint to continue
    note: str  # one line: continuing, or starting afresh and why

    def tags(self, kind: str) -> dict[str, str]:
        """The retry's tags on its run (`robustlab.<kind>.retry_of`, the note)."""
        return {f"robustlab.{kind}.retry_of": str(self.of), "robustlab.retry_note": self.note}


def retry_tags(retry: Retry | None, kind: str) -> dict[str, str]:
    return {} if retry is None else retry.tags(kind)


class RunOnTrial:
    """An `on_epoch` hook that puts the active MLflow run's id on the trial at its first epoch
    (as soon as the run exists: a lost run is found and its checkpoint continued)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial, self.run_id = trial, None

    def __call__(self, metrics: dict[str, float] | None = None, step: int = 0) -> None:
        if self.run_id is None:
            self.run_id = mlflow.active_run().info.run_id
            self.trial.set_user_attr(RUN_ATTR, self.run_id)


# ---- election and the parent run ---------------------------------------------------------


def open_study(url: str, name: str, hint: str) -> optuna.Study:
    """The study `name` at `url` (for a worker); ConfigError naming `hint` when there is none."""
    study = load_existing(open_storage(url), name)
    if study is None:
        raise ConfigError(f"no study {name!r} in {redact_url(url)}; {hint}")
    return study


def check_existing(storage: RDBStorage, plan: Plan) -> optuna.Study | None:
    """The study `plan.study_name` when it exists and runs this plan; ConfigError otherwise."""
    study = load_existing(storage, plan.study_name)
    if study is None:
        return None
    kind = study.user_attrs.get(ATTR_KIND)
    if kind is not None and kind != plan.kind:
        raise ConfigError(
            f"study {plan.study_name!r} exists and is not a {plan.kind} study (it is a {kind} "
            "study); choose another study name"
        )
    why = plan.incompatibility(study)
    if why:
        raise ConfigError(why)
    return study


def _create_or_load(storage: RDBStorage, plan: Plan) -> optuna.Study:
    for attempt in range(5):
        try:
            return optuna.create_study(
                study_name=plan.study_name,
                storage=storage,
                directions=list(plan.directions),
                load_if_exists=True,
            )
        except Exception:  # noqa: BLE001 - a concurrent creator won the race (IntegrityError)
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def elect(storage: RDBStorage, plan: Plan) -> tuple[optuna.Study, Lease | None]:
    """(study, lease): a Lease when this process leads, None while a live leader exists (its
    beat is younger than the grace period). The study is created if missing; of any number of
    simultaneous claims exactly one wins (`election.claim`)."""
    study = _create_or_load(storage, plan)
    return study, claim(study, plan.heartbeat)


def join_wait(heartbeat: Heartbeat) -> float:
    """How long a joiner waits for the leader's parent run: longer than the grace period."""
    return max(JOIN_WAIT_S, 3.0 * heartbeat.grace_period)


def wait_for_leader(study: optuna.Study, storage: RDBStorage, heartbeat: Heartbeat) -> str | None:
    """The live leader's parent run once it is RUNNING (a joiner waits for the leader to finish
    setting the study up); None when that leader died meanwhile (elect again); RobustlabError
    after `join_wait` seconds."""
    client = MlflowClient()
    timeout = join_wait(heartbeat)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = leader_record(study)
        if not is_fresh(record, heartbeat):
            return None
        attrs = optuna.load_study(study_name=study.study_name, storage=storage).user_attrs
        parent = attrs.get(ATTR_PARENT)
        if parent and attrs.get(ATTR_PARENT_TOKEN) == record.get("token"):
            with contextlib.suppress(MlflowException):
                if client.get_run(parent).info.status == "RUNNING":
                    return parent
        time.sleep(1.0)
    raise RobustlabError(
        f"study {study.study_name!r} has a live leader but no running parent run after "
        f"{timeout:.0f} s; retry, or start a worker with robustlab <plan>-worker"
    )


def end_dead_parent(study: optuna.Study) -> str | None:
    """The parent run of a leader that died, ended FAILED with the reason (called by the new
    leader, which holds the lease: no other leader is alive); its id, or None."""
    old = study.user_attrs.get(ATTR_PARENT)
    if not old:
        return None
    client = MlflowClient()
    with contextlib.suppress(MlflowException):
        if client.get_run(old).info.status == "RUNNING":
            client.set_tag(old, LEADER_LOST_TAG, DEAD_LEADER_REASON)
            client.set_terminated(old, "FAILED")
            print(f"note: parent run {old}: {DEAD_LEADER_REASON}", file=sys.stderr, flush=True)
            return old
    return None


def check_lease(lease: Lease | None, plan: Plan) -> None:
    """RobustlabError once this process may no longer lead (another process may lead now)."""
    if lease is not None and not lease.held():
        raise RobustlabError(
            f"lost the leadership of study {plan.study_name} (the database was unreachable for "
            "longer than the grace period, or another process took over); the new leader "
            "finishes it, or run the same command again"
        )


@contextlib.contextmanager
def parent_run(
    plan: Plan,
    storage: RDBStorage,
    url: str,
    *,
    study: optuna.Study | None = None,
    lease: Lease | None = None,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
) -> Iterator[tuple[Run, optuna.Study, Lease]]:
    """The leader's (parent run, study, lease): a dead leader's parent ended FAILED, the
    study's kind and plan attributes written, the earlier parent's runs adopted and the lease
    beaten; the run ends FAILED if the body raises. The body calls `announce` once the study is
    ready for workers.

    `study` is the elected study (`elect`); None creates a fresh one named
    `<kind>-<parent run id>` once the run exists (a plan with an empty `study_name`)."""
    if study is not None:
        end_dead_parent(study)
    held: list[Lease] = []
    with contextlib.ExitStack() as stack:
        # the lease is released only after the parent run has ended: a joiner that sees the
        # lease released while the parent is still RUNNING takes the leader for dead
        stack.callback(lambda: [lease.__exit__(None, None, None) for lease in held])
        parent = stack.enter_context(start_run(run_name, params=params, tags=tags))
        if study is None:
            plan.study_name = plan.study_name or f"{plan.kind}-{parent.info.run_id}"
            study = _create_or_load(storage, plan)
            lease = claim(study, plan.heartbeat)
        if lease is None:
            raise RobustlabError(f"study {plan.study_name} was claimed by another leader")
        held.append(lease.start())
        study.set_metric_names(list(plan.metric_names))
        for key, value in {ATTR_KIND: plan.kind, **plan.study_attrs()}.items():
            study.set_user_attr(key, value)
        adopt_runs(study, parent.info.run_id)
        mlflow.set_tags(
            {"robustlab.study": plan.study_name, "robustlab.optuna_storage": redact_url(url)}
        )
        yield parent, study, lease


def announce(study: optuna.Study, parent: Run, lease: Lease) -> None:
    """Publish the parent run on the study: joiners and workers nest their runs under it."""
    study.set_user_attr(ATTR_EXPERIMENT, parent.info.experiment_id)
    study.set_user_attr(ATTR_PARENT, parent.info.run_id)
    study.set_user_attr(ATTR_PARENT_TOKEN, lease.token)


def adopt_runs(study: optuna.Study, parent_id: str) -> None:
    """Move the runs of the study's trials under `parent_id` (a resumed study): the COMPLETE
    ones the summary reads, and the lost ones it ends FAILED."""
    client = MlflowClient()
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get(RUN_ATTR)
        if run_id:
            with contextlib.suppress(MlflowException):
                client.set_tag(run_id, "mlflow.parentRunId", parent_id)


# ---- the worker loop -----------------------------------------------------------------------


def checkpointed_run(run_id: str | None) -> tuple[str | None, str]:
    """(`run_id`, note) when that lost run left an intact checkpoint to continue from, else
    (None, why it starts afresh): no run, no checkpoint, or a partial/corrupt one."""
    from robustlab.train.checkpoint import CHECKPOINT_ARTIFACT, newest_intact

    if not run_id:
        return None, "starting afresh: the lost trial had no run yet"
    if _finished_unreported(run_id):
        return None, f"starting afresh: run {run_id} finished but its trial was never told"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=tmp
            )
            newest_intact(Path(folder))
        except Exception as exc:  # noqa: BLE001 - no run, no checkpoint or a broken one
            why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            return None, f"starting afresh: no intact checkpoint in run {run_id} ({why})"
    return run_id, f"continuing run {run_id} from its checkpoint"


def _finished_unreported(run_id: str) -> bool:
    """Whether the lost trial's run FINISHED (its worker died between ending the run and telling
    the trial): a finished run cannot be continued, so it is ended FAILED, tagged lost, and the
    retry trial runs the point again (one FINISHED run per COMPLETE trial)."""
    try:
        if MlflowClient().get_run(run_id).info.status != "FINISHED":
            return False
    except MlflowException:
        return False
    end_lost_run(
        run_id,
        "its worker died after the run finished and before its trial was told; the retry trial "
        "runs the point again",
    )
    return True


def end_lost_run(run_id: str, reason: str) -> None:
    """End a lost trial's run FAILED, tagged `LOST_TAG` with `reason` (best effort)."""
    with contextlib.suppress(MlflowException):
        MlflowClient().set_tag(run_id, LOST_TAG, reason)
        MlflowClient().set_terminated(run_id, "FAILED")


def retry_of(study: optuna.Study, trial: optuna.Trial) -> Retry | None:
    """The Retry for `trial` when it re-runs a lost trial (RetryHeartbeatStaleTrialCallback)."""
    frozen = study.get_trials(deepcopy=False)[trial.number]
    lost = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    if lost is None:
        return None
    run_id, note = checkpointed_run(frozen.user_attrs.get(RUN_ATTR))
    print(f"trial {trial.number} retries trial {lost}: {note}", file=sys.stderr, flush=True)
    return Retry(lost, run_id, note)


def fail_stale(study: optuna.Study, heartbeat: Heartbeat) -> list[int]:
    """`fail_stale_trials`, with the reason recorded (study attribute `robustlab_fail_reason_<n>`)
    for each trial it fails; skipped while this process itself was cut off from the database in
    the last grace period (a gap in everyone's heartbeats is then no sign of a dead worker).
    The numbers of the trials it failed."""
    if time.monotonic() - last_outage() < heartbeat.grace_period:
        return []
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    with_db_retry(fail_stale_trials, study)  # its stale-trial query is not a retried call
    failed = [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.number in running
    ]
    for n in failed:
        study.set_user_attr(
            f"{FAIL_REASON}_{n}",
            f"no heartbeat for more than {heartbeat.grace_period} s (its worker died or lost the "
            "database); retried with the same parameters",
        )
    return failed


def _tell(study: optuna.Study, trial: optuna.Trial, values) -> bool:
    """Tell `values` unless the trial was declared lost meanwhile (its worker was cut off from
    the database longer than the grace period and another process failed it): then its run is
    ended FAILED with the reason, and False (the retry trial runs the point again). A tell whose
    write committed although its answer was lost (a retried write then finds the trial
    finished) is recognised by the trial's state: a COMPLETE trial is never declared lost."""
    frozen = study.get_trials(deepcopy=False)[trial.number]
    if frozen.state == TrialState.RUNNING:
        with contextlib.suppress(ValueError, RuntimeError):  # lost between the check and now
            study.tell(trial, values)
            return True
        frozen = study.get_trials(deepcopy=False)[trial.number]
    if frozen.state == TrialState.COMPLETE:
        return True
    reason = (
        f"trial {trial.number} was declared lost while it still ran (no heartbeat reached the "
        "database for longer than the grace period); its retry trial runs the point again"
    )
    print(f"note: {reason}", file=sys.stderr, flush=True)
    run_id = frozen.user_attrs.get(RUN_ATTR)
    if run_id:
        end_lost_run(run_id, reason)
    return False


def work(
    study: optuna.Study,
    plan: Plan,
    *,
    max_trials: int = 0,
    timeout: float | None = None,
    after_trial: Callable[[], None] | None = None,
) -> int:
    """Run the plan's trials until it is done, none is left for this worker, `max_trials` were
    run or `timeout` seconds passed; the number run. A trial that raises ends FAIL and the error
    propagates; `optuna.TrialPruned` ends it PRUNED."""
    started, done = time.monotonic(), 0
    while not (max_trials and done >= max_trials):
        if timeout is not None and time.monotonic() - started >= timeout:
            break
        fail_stale(study, plan.heartbeat)  # a dead worker's trial comes back WAITING
        if plan.done(study):  # the storage retries its calls through a database outage
            break
        trial = plan.next_trial(study)
        if trial is None:
            break
        with optuna_compat.heartbeat(study, trial):
            try:
                values = plan.run_trial(trial, retry_of(study, trial))
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
                values = ()
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    why = (str(exc).splitlines() or [""])[0][:300]
                    trial.set_user_attr(FAIL_REASON, f"{type(exc).__name__}: {why}")
                study.tell(trial, state=TrialState.FAIL)
                raise
        if values is None:
            trial.set_user_attr(FAIL_REASON, "not a trial of this plan")
            study.tell(trial, state=TrialState.FAIL)
            continue
        if values != () and not _tell(study, trial, values):
            continue
        done += 1
        gc.collect()
        if after_trial is not None:
            after_trial()
    return done


# ---- driving worker processes -------------------------------------------------------------


def worker_env(url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A worker's environment: the study URL and the tracking URI here (never on its command
    line, where `ps` shows it to every user), without the MLflow run of an `mlflow run` parent."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env[STORAGE_ENV] = url
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    env.update(extra or {})
    return env


def worker_command(command: str, study_name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "robustlab.cli", command, "--study-name", study_name, *args]


def drive(
    study: optuna.Study,
    plan: Plan,
    spawn: Callable[[int], subprocess.Popen],
    *,
    workers: int,
    demand: Callable[[optuna.Study], int],
    max_failures: int,
    deadline: float | None = None,
    lease: Lease | None = None,
    progress: Callable[[optuna.Study], None] | None = None,
) -> None:
    """Keep up to `workers` worker processes (`spawn(i)`) busy until the plan is done and no
    trial runs; `demand(study)` is how many more workers the study can use now; `progress` is
    called as it waits.

    Trials RUNNING elsewhere (workers on other machines) are waited for; a dead worker's trial
    comes back WAITING once its heartbeat is stale (`fail_stale_trials`)."""
    procs: list[subprocess.Popen] = []
    failures, spawned = 0, 0
    try:
        while True:
            for p in [p for p in procs if p.poll() is not None]:
                procs.remove(p)
                failures += p.returncode != 0
            check_lease(lease, plan)
            fail_stale(study, plan.heartbeat)
            if progress is not None:
                progress(study)
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if plan.done(study) and not procs and not running:
                return
            if failures > max_failures:
                raise RobustlabError(
                    f"{plan.kind} workers failed {failures} times (see their output above); fix "
                    f"the cause and run the same command again (study {plan.study_name})"
                )
            late = deadline is not None and time.monotonic() >= deadline
            want = 0 if late else min(demand(study), workers - len(procs))
            for _ in range(max(0, want)):
                procs.append(spawn(spawned))
                spawned += 1
            if not procs and not running and (late or demand(study) <= 0):
                if late or plan.done(study):
                    return
                raise RobustlabError(
                    f"{plan.kind} study {plan.study_name}: trials failed and nothing is left to "
                    "run (see the worker output above); run the same command again to retry them"
                )
            time.sleep(1.0 if procs else min(5.0, plan.heartbeat.interval))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def wait_for_running(
    study: optuna.Study,
    plan: Plan,
    lease: Lease | None = None,
    progress: Callable[[optuna.Study], None] | None = None,
) -> None:
    """Block while trials of this study run elsewhere (stale ones are failed and requeued)."""
    heartbeat = plan.heartbeat
    while True:
        check_lease(lease, plan)
        fail_stale(study, heartbeat)
        if progress is not None:
            progress(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(min(5.0, heartbeat.interval))


# ---- readers ----------------------------------------------------------------------------------


def complete_runs(study: optuna.Study, key: Callable[[FrozenTrial], Any]) -> dict[Any, str]:
    """key(trial) -> the run of its first COMPLETE trial (trials whose key is None are skipped)."""
    runs: dict[Any, str] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        k = key(t)
        if k is not None and RUN_ATTR in t.user_attrs:
            runs.setdefault(k, t.user_attrs[RUN_ATTR])
    return runs


def finished_children(parent_id: str, what: str = "run") -> tuple[Run, list[Run]]:
    """(parent run, its FINISHED child runs); ConfigError (one line) for an unknown parent."""
    client = MlflowClient()
    try:
        parent = client.get_run(parent_id)
    except MlflowException:
        raise ConfigError(
            f"{what}={parent_id}: no such run in this tracking store ({redact_url(client.tracking_uri)}); "
            "pass the run id of an experiment's parent run"
        ) from None
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
    )
    return parent, children


def end_lost_runs(study: optuna.Study, keep: set[str], tag: str) -> None:
    """Runs of FAILED trials (a worker that died, an error) still RUNNING: end them FAILED.

    A run whose worker died before its first epoch is not on its trial yet (`RunOnTrial`): it
    is found by its tags (`robustlab.study`, `robustlab.trial`) in the study's experiment."""
    client = MlflowClient()
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    run_ids = [t.user_attrs.get(RUN_ATTR) for t in failed]
    untold = {str(t.number) for t in failed if RUN_ATTR not in t.user_attrs}
    experiment = study.user_attrs.get(ATTR_EXPERIMENT)
    if untold and experiment:
        with contextlib.suppress(MlflowException):
            running = client.search_runs(
                [experiment],
                filter_string=f"tags.`robustlab.study` = '{study.study_name}' "
                "and attributes.status = 'RUNNING'",
            )
            run_ids += [
                r.info.run_id for r in running if r.data.tags.get("robustlab.trial") in untold
            ]
    for run_id in dict.fromkeys(run_ids):
        if not run_id or run_id in keep:
            continue
        with contextlib.suppress(MlflowException):
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, tag, "true")
                client.set_terminated(run_id, "FAILED")
