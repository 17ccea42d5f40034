"""Per-epoch checkpoints (weights, optimizer, loop state) so an interrupted run can resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

CHECKPOINT_ARTIFACT = "checkpoint"


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
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_checkpoint(
    folder: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer
) -> tuple[LoopState, list[np.ndarray] | None]:
    """Restore model and optimizer in place; return the loop state and best weights."""
    model.load_weights(folder / "model.weights.h5")
    optimizer.build(model.trainable_variables)
    with np.load(folder / "optimizer.npz") as f:
        values = [f[f"arr_{i}"] for i in range(len(f.files))]
    for var, value in zip(optimizer.variables, values, strict=True):
        var.assign(value)
    best = None
    if (folder / "best.npz").is_file():
        with np.load(folder / "best.npz") as f:
            best = [f[f"arr_{i}"] for i in range(len(f.files))]
    state = LoopState(**json.loads((folder / "state.json").read_text()))
    return state, best
