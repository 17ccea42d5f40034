"""Leadership of a study, fenced: at most one leader at any time, also through a database outage.

The leader's record is the study attribute `robustlab_leader` (`{"token", "beat"}`), written only
by compare-and-set on its stored text (`optuna_compat.compare_and_set_study_attr`):

- a claim replaces a record whose beat is older than the grace period (or none), so of several
  simultaneous claims exactly one succeeds;
- a beat replaces only the leader's own last record; its timestamp is taken for each attempt
  (after any retry), and a failed compare-and-set means another process took over;
- the leader holds the lease while its last successful beat (its clock read before that write)
  is younger than the grace period: a rival can claim only once that beat's timestamp is older
  than the grace period, so the two never overlap, whatever the database did meanwhile;
- beating starts with the claim (`claim` returns a beating lease) and stops on release;
- release (`__exit__`) zeroes the record only if it is still the leader's own.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from typing import Any

import optuna

from robustlab.config import Heartbeat
from robustlab.launch import optuna_compat
from robustlab.launch.storage import DB_ERRORS, with_db_retry

ATTR_LEADER = "robustlab_leader"  # JSON {"token", "beat"}: the leading process's heartbeat


def leader_record(study: optuna.Study) -> dict[str, Any]:
    """The stored leader record (`{}` when none), read fresh from the database."""
    storage = optuna_compat.storage_of(study)
    sid = optuna_compat.study_id(study)
    raw = with_db_retry(optuna_compat.read_study_attr, storage, sid, ATTR_LEADER)
    return _parse(raw)


def _parse(raw: str | None) -> dict[str, Any]:
    try:
        record = json.loads(json.loads(raw)) if raw else {}
    except (TypeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def is_fresh(record: dict[str, Any], heartbeat: Heartbeat) -> bool:
    beat = record.get("beat")
    return isinstance(beat, int | float) and time.time() - beat < heartbeat.grace_period


class Lease:
    """This process's leadership of `study` (from `claim`), beaten from a daemon thread while
    used as a context manager."""

    def __init__(
        self, study: optuna.Study, heartbeat: Heartbeat, token: str, raw: str, written: float
    ) -> None:
        self.study, self.heartbeat, self.token = study, heartbeat, token
        self._raw, self._ok = raw, written  # our stored text; (monotonic) before it was written
        self._lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def _where(self) -> tuple:
        return optuna_compat.storage_of(self.study), optuna_compat.study_id(self.study)

    def held(self) -> bool:
        """Whether no other process can lead now (our last beat is recent enough)."""
        return not self._lost and time.monotonic() - self._ok < self.heartbeat.grace_period

    def beat(self) -> None:
        """One compare-and-set of our record; a database error skips it (the lease may then
        run out: `held`), a lost compare-and-set ends the lease for good."""
        if self._lost:
            return
        storage, sid = self._where
        started = time.monotonic()
        text = json.dumps({"token": self.token, "beat": time.time()})
        try:
            won = optuna_compat.compare_and_set_study_attr(
                storage, sid, ATTR_LEADER, self._raw, text
            )
        except DB_ERRORS:
            return
        if won:
            self._raw, self._ok = json.dumps(text), started
        elif _parse(optuna_compat.read_study_attr(storage, sid, ATTR_LEADER)).get("token") != (
            self.token
        ):
            self._lost = True

    def _run(self) -> None:
        while not self._stop.wait(max(1, self.heartbeat.interval // 2)):
            with contextlib.suppress(Exception):  # a database hiccup skips one beat
                self.beat()

    def start(self) -> Lease:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()
        return self

    def __enter__(self) -> Lease:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._lost:
            return
        storage, sid = self._where
        text = json.dumps({"token": self.token, "beat": 0})
        with contextlib.suppress(Exception):  # the study is no longer led: a new command leads
            optuna_compat.compare_and_set_study_attr(storage, sid, ATTR_LEADER, self._raw, text)


def claim(study: optuna.Study, heartbeat: Heartbeat) -> Lease | None:
    """A Lease when this process now leads `study`; None while another leader is alive or
    another claim won. Retried through a database outage; a claim whose write committed but
    whose answer was lost is recognised by its token."""
    storage, sid = optuna_compat.storage_of(study), optuna_compat.study_id(study)
    token = uuid.uuid4().hex

    def attempt() -> Lease | None:
        raw = optuna_compat.read_study_attr(storage, sid, ATTR_LEADER)
        current = _parse(raw)
        if current.get("token") == token:  # an earlier attempt committed
            age = time.time() - float(current["beat"])
            return Lease(study, heartbeat, token, raw, time.monotonic() - age).start()
        if is_fresh(current, heartbeat):
            return None
        started = time.monotonic()
        text = json.dumps({"token": token, "beat": time.time()})
        if optuna_compat.compare_and_set_study_attr(storage, sid, ATTR_LEADER, raw, text):
            return Lease(study, heartbeat, token, json.dumps(text), started).start()
        return None

    return with_db_retry(attempt)
