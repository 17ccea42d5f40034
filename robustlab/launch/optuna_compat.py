"""Every private Optuna API robustlab relies on, wrapped in one place (Optuna 5.0.x, pinned).

Workers pop enqueued trials without asking the sampler for new points (an experiment's pairs),
record an enqueued value as a trial's parameter, and beat a trial's heartbeat around work that
does not run under `study.optimize`. Optuna has no public API for these; if an upgrade removes
one, tests/test_optuna_compat.py fails loudly, naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage


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
