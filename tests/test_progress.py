"""The leader's progress: a line and the parent run's metrics each time a unit completes."""

from __future__ import annotations

import io

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from robustlab.launch.progress import Progress
from robustlab.tracking import start_run

PLANNED = 4


def _tally(study: optuna.Study) -> tuple[int, int]:
    return len(study.get_trials(states=(TrialState.COMPLETE,))), PLANNED


def test_progress_logs_the_counts_on_the_parent_and_a_line_with_the_pace(tracking):
    study = optuna.create_study()
    with start_run("experiment", system_metrics=False) as parent:
        parent_id = parent.info.run_id
    now = [1000.0]
    out = io.StringIO()
    progress = Progress("experiment", parent_id, _tally, out=out, clock=lambda: now[0])

    progress(study)  # the leader starts: nothing complete, no pace yet
    progress(study)  # nothing moved: no second line
    running = study.ask()
    now[0] += 60
    progress(study)
    for _ in range(2):
        study.tell(study.ask(), 0.5)
    now[0] += 540
    progress(study)  # 2 complete in 10 minutes, 2 left

    lines = out.getvalue().splitlines()
    assert lines == [
        "experiment: 0 of 4 complete, 0 running; 0 min since this leader started",
        "experiment: 0 of 4 complete, 1 running; 1 min since this leader started",
        "experiment: 2 of 4 complete, 1 running; 10 min since this leader started; "
        "about 10 min left at this pace",
    ]
    client = MlflowClient()
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(parent_id, f"experiment/{key}")]
        for key in ("complete", "left", "running")
    }
    assert history == {
        "complete": [(0, 0.0), (0, 0.0), (2, 2.0)],
        "left": [(0, 4.0), (0, 4.0), (2, 2.0)],
        "running": [(0, 0.0), (0, 1.0), (2, 1.0)],
    }
    study.tell(running, 0.5)
    now[0] += 3 * 3600
    progress(study)
    assert out.getvalue().splitlines()[-1] == (
        "experiment: 3 of 4 complete, 0 running; 3 h 10 min since this leader started; "
        "about 1 h 03 min left at this pace"
    )


def test_a_store_that_refuses_the_metrics_does_not_stop_the_leader(tracking):
    out = io.StringIO()
    progress = Progress("tune", "0" * 32, _tally, out=out)  # no such parent run in the store
    progress(optuna.create_study())
    logged, shown = out.getvalue().splitlines()
    assert logged.startswith("tune: progress not logged on the parent run (")
    assert shown == "tune: 0 of 4 complete, 0 running; 0 min since this leader started"
