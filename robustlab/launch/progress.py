"""A study's progress, shown by its leader: a line each time a unit completes, and the counts
as metrics on the parent run (the MLflow UI draws them against time)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import optuna
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


class Progress:
    """Called by the leader as it waits: when the number of complete or running units changes,
    log `<kind>/complete`, `<kind>/left` and `<kind>/running` on the parent run (step =
    complete) and print `<kind>: C of N complete, R running; elapsed; about T left at this
    pace` (the pace of the units completed since this leader started)."""

    def __init__(
        self,
        kind: str,
        parent_id: str,
        tally: Callable[[optuna.Study], tuple[int, int]],
        *,
        out: TextIO = sys.stderr,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind, self.parent_id, self.tally = kind, parent_id, tally
        self.out, self.clock = out, clock
        self.start: tuple[float, int] | None = None  # (time, complete) when this leader began
        self.last: tuple[int, int] | None = None

    def __call__(self, study: optuna.Study) -> None:
        complete, planned = self.tally(study)
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        now = self.clock()
        if self.start is None:
            self.start = (now, complete)
        if self.last == (complete, running):
            return
        self.last = (complete, running)
        left = planned - complete
        values = {"complete": complete, "left": left, "running": running}
        try:
            stamp = int(time.time() * 1000)
            MlflowClient().log_batch(
                self.parent_id,
                metrics=[
                    Metric(f"{self.kind}/{k}", float(v), stamp, complete) for k, v in values.items()
                ],
            )
        except Exception as exc:  # noqa: BLE001 - a store away or busy: the study goes on
            why = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            print(f"{self.kind}: progress not logged on the parent run ({why})", file=self.out)
        line = f"{self.kind}: {complete} of {planned} complete, {running} running"
        elapsed = now - self.start[0]
        line += f"; {_duration(elapsed)} since this leader started"
        if (since := complete - self.start[1]) > 0 and left > 0:
            line += f"; about {_duration(elapsed / since * left)} left at this pace"
        print(line, file=self.out, flush=True)
