"""Every private Optuna API robustlab relies on, wrapped in one place (Optuna 5.0.x, pinned).

Workers pop enqueued trials without asking the sampler for new points (an experiment's pairs),
record an enqueued value as a trial's parameter, and beat a trial's heartbeat around work that
does not run under `study.optimize`; stale trials include those that never beat; the leader's
claim on a study is a compare-and-set on its attribute row (RDB schema). Optuna has no public API for these; if an upgrade removes
one, tests/test_optuna_compat.py fails loudly, naming it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Iterator

import optuna
import sqlalchemy.exc
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState
from sqlalchemy import orm


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study was loaded with."""
    return study._storage


def trial_id(trial: optuna.Trial) -> int:
    """A live trial's storage id (its `number` is the study-local index)."""
    return trial._trial_id


def pop_waiting_trial(study: optuna.Study) -> optuna.Trial | None:
    """Atomically take one WAITING (enqueued) trial and mark it RUNNING; None when none waits.

    Unlike `study.ask()`, this never creates a new trial."""
    popped = study._pop_waiting_trial_id()
    return None if popped is None else optuna.Trial(study, popped)


def record_enqueued_param(trial: optuna.Trial, name: str, dist: BaseDistribution) -> object:
    """The value enqueued for `name` (the trial's fixed parameter), recorded under `dist`."""
    return trial._suggest(name, dist)


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Beat `trial`'s heartbeat (when the storage has heartbeats) for the duration of the block."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(trial_id(trial), storage_of(study)):
        yield


class StaleAwareRDBStorage(RDBStorage):
    """An RDBStorage whose stale trials (`fail_stale_trials`) also include RUNNING trials that
    never beat and started more than the grace period ago: a worker killed before its first
    heartbeat, or a trial left RUNNING by a retried write (`create_new_trial`, a pop) that no
    worker holds. Optuna skips trials without a heartbeat row, so these would run forever."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        cutoff = now - datetime.timedelta(seconds=grace)  # the column holds naive UTC
        with orm.Session(self.engine) as session:
            rows = (
                session.query(models.TrialModel.trial_id)
                .outerjoin(
                    models.TrialHeartbeatModel,
                    models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id,
                )
                .filter(models.TrialModel.study_id == study_id)
                .filter(models.TrialModel.state == TrialState.RUNNING)
                .filter(models.TrialHeartbeatModel.trial_id.is_(None))
                .filter(models.TrialModel._datetime_start_utc < cutoff)
                .all()
            )
        return stale + [r[0] for r in rows if r[0] not in stale]


def study_id(study: optuna.Study) -> int:
    return study._study_id


def _rdb(storage: BaseStorage) -> RDBStorage:
    """The RDBStorage under Optuna's cache wrapper (`optuna.load_study` adds one)."""
    return getattr(storage, "_backend", storage)


def read_study_attr(storage: BaseStorage, sid: int, key: str) -> str | None:
    """The stored JSON text of a study user attribute (None: not set), read fresh."""
    with orm.Session(_rdb(storage).engine) as session:
        row = (
            session.query(models.StudyUserAttributeModel.value_json)
            .filter_by(study_id=sid, key=key)
            .one_or_none()
        )
    return None if row is None else row[0]


def compare_and_set_study_attr(
    storage: BaseStorage, sid: int, key: str, expected: str | None, value: object
) -> bool:
    """Set a study user attribute to `value` only if its stored JSON text is still `expected`
    (None: not set); one statement, so of two concurrent writers at most one succeeds."""
    new = json.dumps(value)
    table = models.StudyUserAttributeModel.__table__
    with _rdb(storage).engine.begin() as conn:
        if expected is None:
            try:
                conn.execute(table.insert().values(study_id=sid, key=key, value_json=new))
            except sqlalchemy.exc.IntegrityError:
                return False
            return True
        done = conn.execute(
            table.update()
            .where(table.c.study_id == sid, table.c.key == key, table.c.value_json == expected)
            .values(value_json=new)
        )
        return done.rowcount == 1
