"""Carry an unfinished training run to another tracking store (another machine, a fresh clone).

`export_run` writes a folder (a *bundle*) holding what resuming needs: the run's params and tags,
its training metrics (the `system/` ones describe the host, not the run, and stay behind), its
datasets, its artifacts (the excluded MNIST sources among them) and its newest intact epoch
checkpoint, each file's SHA-256 in `run.json`. `import_run` recreates the run from a bundle in
the configured store, unfinished (KILLED) and tagged `CARRIED_TAG` with the id of the run first
exported, so `--auto-resume` (or `--resume-run-id`) continues it there from that checkpoint.
Importing is idempotent: a store that already holds the run (the original or an import of it) at
the bundle's epoch or later is left alone.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustlab.digests import check_digests, file_digests
from robustlab.errors import ConfigError
from robustlab.train.checkpoint import CHECKPOINT_ARTIFACT, STATE, newest_intact

FORMAT = 1
RUN_FILE = "run.json"
ARTIFACTS = "artifacts"
CARRIED_TAG = "robustlab.carried_from"  # the run first exported, kept through every carry
SYSTEM_PREFIX = "system/"
# MLflow tags that belong to the store the run lived in, not to the run
_STORE_TAGS = ("mlflow.runName", "mlflow.parentRunId", "mlflow.log-model.history")
_BATCH = 1000  # MLflow's limit of metrics per log_batch call


@dataclass(frozen=True)
class Imported:
    """What `import_run` did: the run id that now holds the bundle's run, and whether it was
    created (False: the store already held the run at the bundle's epoch or later)."""

    run_id: str
    created: bool
    epoch: int


def export_run(run_id: str, out: Path) -> dict[str, Any]:
    """Write the bundle of unfinished run `run_id` into `out` (replaced whole, atomically); return
    its `run.json`. Refused (one line) when the run FINISHED or left no intact checkpoint."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    if run.info.status == "FINISHED":
        raise ConfigError(
            f"run {run_id} FINISHED: its model is runs:/{run_id}/model (ship it with "
            "`robustlab register --model-uri runs:/<id>/model --export pretrained/<name>`)"
        )
    if run.data.tags.get("mlflow.parentRunId"):
        raise ConfigError(f"run {run_id} is a nested run; carry its top-level run")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            got = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=scratch
                )
            )
            folder, state = newest_intact(got)  # refuses a run with no intact checkpoint
            shutil.copytree(folder, tmp / CHECKPOINT_ARTIFACT)
        for item in client.list_artifacts(run_id):
            if item.path != CHECKPOINT_ARTIFACT:
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=item.path, dst_path=str(tmp / ARTIFACTS)
                )
        experiment = client.get_experiment(run.info.experiment_id)
        tags = {k: v for k, v in run.data.tags.items() if k not in _STORE_TAGS}
        bundle = {
            "format": FORMAT,
            "run_id": run_id,
            "carried_from": run.data.tags.get(CARRIED_TAG, run_id),
            "experiment": experiment.name,
            "run_name": run.info.run_name,
            "epoch": state["global_epoch"],
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": dict(run.data.params),
            "tags": {**tags, CARRIED_TAG: run.data.tags.get(CARRIED_TAG, run_id)},
            "metrics": {
                key: [
                    [m.step, m.timestamp, m.value] for m in client.get_metric_history(run_id, key)
                ]
                for key in sorted(run.data.metrics)
                if not key.startswith(SYSTEM_PREFIX)
            },
            "datasets": [_dataset_dict(d) for d in run.inputs.dataset_inputs],
            "files": file_digests(tmp, (f for f in tmp.rglob("*") if f.is_file())),
        }
        (tmp / RUN_FILE).write_text(json.dumps(bundle, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bundle


def _dataset_dict(dataset_input) -> dict[str, Any]:
    d = dataset_input.dataset
    return {
        "name": d.name,
        "digest": d.digest,
        "source_type": d.source_type,
        "source": d.source,
        "schema": d.schema,
        "profile": d.profile,
        "tags": {t.key: t.value for t in dataset_input.tags},
    }


def read_bundle(folder: Path) -> dict[str, Any]:
    """The bundle's `run.json`, every file checked against its digest; ConfigError (one line)
    naming what is missing, altered or unreadable."""
    folder = Path(folder)
    try:
        bundle = json.loads((folder / RUN_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{folder}: no {RUN_FILE}; pass a folder written by `robustlab carry export`"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{folder / RUN_FILE}: not JSON ({exc}); export the run again") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise ConfigError(
            f"{folder / RUN_FILE}: not a format-{FORMAT} bundle; export it again with this version"
        )
    check_digests(
        folder,
        bundle.get("files", {}),
        RUN_FILE,
        "restore the folder (e.g. `git checkout -- <folder>`) or export the run again",
    )
    if f"{CHECKPOINT_ARTIFACT}/{STATE}" not in bundle.get("files", {}):
        raise ConfigError(f"{folder}: no checkpoint listed in {RUN_FILE}; export the run again")
    return bundle


def import_run(folder: Path) -> Imported:
    """Recreate the bundle's run in the configured store (see the module docstring)."""
    from mlflow.tracking import MlflowClient

    from robustlab.tracking import configure_tracking, ensure_experiment

    folder = Path(folder)
    bundle = read_bundle(folder)
    configure_tracking()
    client = MlflowClient()
    held = _held(client, bundle["carried_from"])
    if held is not None and held[1] >= bundle["epoch"]:
        return Imported(held[0], False, held[1])
    run = client.create_run(
        ensure_experiment(bundle["experiment"]),
        run_name=bundle["run_name"],
        tags=bundle["tags"],
    )
    run_id = run.info.run_id
    try:
        _log_contents(client, run_id, folder, bundle)
    except BaseException:
        client.delete_run(run_id)  # no half-imported run is left to be resumed
        raise
    client.set_terminated(run_id, "KILLED")
    return Imported(run_id, True, bundle["epoch"])


def _log_contents(client, run_id: str, folder: Path, bundle: dict[str, Any]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

    params = [Param(k, v) for k, v in bundle["params"].items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    metrics = [
        Metric(key, value, timestamp, step)
        for key, rows in bundle["metrics"].items()
        for step, timestamp, value in rows
    ]
    for i in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
    inputs = [
        DatasetInput(
            Dataset(
                d["name"], d["digest"], d["source_type"], d["source"], d["schema"], d["profile"]
            ),
            [InputTag(k, v) for k, v in d["tags"].items()],
        )
        for d in bundle["datasets"]
    ]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    if (folder / ARTIFACTS).is_dir():
        client.log_artifacts(run_id, str(folder / ARTIFACTS))
    checkpoint = folder / CHECKPOINT_ARTIFACT
    slot = f"{CHECKPOINT_ARTIFACT}/slot{bundle['epoch'] % 2}"
    for f in sorted(checkpoint.iterdir()):
        if f.name != STATE:
            client.log_artifact(run_id, str(f), slot)
    client.log_artifact(run_id, str(checkpoint / STATE), slot)  # last, as log_checkpoint does


def _held(client, carried_from: str) -> tuple[str, int] | None:
    """(run id, checkpoint epoch) of the most advanced run of this lineage in the store (the
    original or an import of it), or None; a FINISHED one counts as beyond any bundle."""
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=f"tags.`{CARRIED_TAG}` = '{carried_from}'")
    with contextlib.suppress(Exception):  # the original may live in another store
        runs.append(client.get_run(carried_from))
    best: tuple[str, int] | None = None
    for run in runs:
        epoch = 1 << 30 if run.info.status == "FINISHED" else _checkpoint_epoch(client, run)
        if epoch >= 0 and (best is None or epoch > best[1]):
            best = (run.info.run_id, epoch)
    return best


def _checkpoint_epoch(client, run) -> int:
    """The newest epoch among `run`'s checkpoint slots (their state.json only), -1 for none."""
    import mlflow

    newest = -1
    with tempfile.TemporaryDirectory() as scratch:
        for item in client.list_artifacts(run.info.run_id, CHECKPOINT_ARTIFACT):
            try:
                got = mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id, artifact_path=f"{item.path}/{STATE}", dst_path=scratch
                )
                newest = max(newest, json.loads(Path(got).read_text())["global_epoch"])
            except Exception:  # noqa: BLE001 - an unreadable slot holds no usable checkpoint
                continue
    return newest
