"""Boundary check for models handed to attacks: they must output logits, not probabilities."""

from __future__ import annotations

import contextlib
import weakref

import numpy as np

from robustlab.errors import ConfigError

PROBE_SIZE = 8  # images pushed through the model to look at its outputs
_CHECKED: weakref.WeakSet = weakref.WeakSet()


def check_logits(model, x: np.ndarray | None = None) -> None:
    """Refuse a model whose outputs are not (N, 10) logits.

    Probes the model with the first images of `x` (or seeded uniform noise) and raises
    ConfigError when every row is non-negative and sums to one: a softmax output, on which
    attacks' cross-entropy gradients are wrong (and vanish when the softmax saturates).
    Checked once per model object.
    """
    with contextlib.suppress(TypeError):  # not weak-referenceable: checked every time
        if model in _CHECKED:
            return
    if x is not None and len(x):
        probe = np.asarray(x[:PROBE_SIZE], dtype=np.float32)
    else:
        probe = np.random.default_rng(0).uniform(0.0, 1.0, (PROBE_SIZE, 28, 28, 1))
        probe = probe.astype(np.float32)
    out = np.asarray(model(probe, training=False))
    if out.ndim != 2 or out.shape != (len(probe), 10):
        raise ConfigError(
            f"attacks need a model with (N, 10) logit outputs; this one returns shape {out.shape}"
        )
    if np.all(out >= 0.0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        raise ConfigError(
            "the model outputs probabilities (non-negative rows summing to 1) but attacks need "
            "logits: remove its final softmax activation"
        )
    with contextlib.suppress(TypeError):
        _CHECKED.add(model)
