"""Per-epoch checkpoints (weights, optimizer, loop state) so an interrupted run can resume.

In the MLflow run they alternate between `checkpoint/slot0` and `checkpoint/slot1`, each file's
SHA-256 recorded in its `state.json`, which is logged last: a run killed while logging one slot
still has the other, intact, and resuming picks the newest slot whose files match their digests.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from robustlab.digests import sha256
from robustlab.errors import RobustlabError

if TYPE_CHECKING:  # annotations only: reading and carrying checkpoints needs no TensorFlow
    import keras

CHECKPOINT_ARTIFACT = "checkpoint"
STATE = "state.json"


@dataclass
class LoopState:
    """Where training stands: resumable position plus early-stopping bookkeeping."""

    phase_index: int = 0
    epoch: int = -1  # last finished epoch of the phase (-1: none)
    global_epoch: int = -1  # last finished epoch over all phases (MLflow step)
    best_value: float | None = None
    best_epoch: int = -1
    wait: int = 0
    done: bool = False  # the phase finished (all epochs or early stop)
    rng_state: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    folder: Path,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    best_weights: list[np.ndarray] | None,
    state: LoopState,
) -> Path:
    """Write the checkpoint into `folder` (replaced atomically)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_weights(tmp / "model.weights.h5")
    np.savez(tmp / "optimizer.npz", *[np.asarray(v) for v in optimizer.variables])
    if best_weights is not None:
        np.savez(tmp / "best.npz", *best_weights)
    files = {f.name: sha256(f) for f in sorted(tmp.iterdir())}
    (tmp / STATE).write_text(json.dumps({**asdict(state), "files": files}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def log_checkpoint(folder: Path, run_id: str) -> None:
    """Log `folder` into the run's slot for its epoch (alternating), state.json last."""
    import mlflow

    state = json.loads((folder / STATE).read_text())
    slot = f"{CHECKPOINT_ARTIFACT}/slot{state['global_epoch'] % 2}"
    for f in sorted(folder.iterdir()):
        if f.name != STATE:
            mlflow.log_artifact(str(f), slot, run_id=run_id)
    mlflow.log_artifact(str(folder / STATE), slot, run_id=run_id)


def newest_intact(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint under `folder` (itself or its slots) whose files match their
    digests, with its parsed state.json."""
    best: tuple[Path, dict[str, Any]] | None = None
    for candidate in [folder, *sorted(folder.glob("slot*"))]:
        try:
            data = json.loads((candidate / STATE).read_text())
            intact = all(sha256(candidate / n) == d for n, d in data.get("files", {}).items())
        except (OSError, ValueError):
            continue
        if intact and (best is None or data["global_epoch"] > best[1]["global_epoch"]):
            best = (candidate, data)
    if best is None:
        raise RobustlabError(
            f"no intact checkpoint in {folder} (the run stopped before finishing its first "
            "checkpoint); start a fresh run instead of resuming this one"
        )
    return best


def load_checkpoint(
    folder: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer
) -> tuple[LoopState, list[np.ndarray] | None]:
    """Restore model and optimizer in place from the newest intact checkpoint under `folder`;
    return the loop state and best weights."""
    folder, data = newest_intact(folder)
    model.load_weights(folder / "model.weights.h5")
    optimizer.build(model.trainable_variables)
    with np.load(folder / "optimizer.npz", allow_pickle=False) as f:
        values = [f[f"arr_{i}"] for i in range(len(f.files))]
    for var, value in zip(optimizer.variables, values, strict=True):
        var.assign(value)
    best = None
    if (folder / "best.npz").is_file():
        with np.load(folder / "best.npz", allow_pickle=False) as f:
            best = [f[f"arr_{i}"] for i in range(len(f.files))]
    data.pop("files", None)
    state = LoopState(**data)
    return state, best
