"""One call that makes training reproducible: seeds every RNG a run uses, optionally op determinism.

What a seed covers: Python's `random`, NumPy's global RNG, TensorFlow's global seed (so every
op-level seed inside traced functions is fixed) and Keras 3's global `SeedGenerator` (weight
initialisation, dropout). The training loop's own RNGs are seeded from the same value: the batch
order (`np.random.default_rng(seed)`, saved in the checkpoint) and the attack's random starts
(stateless, keyed by seed and batch position, see `robustlab.attacks.tf_attacks.make_perturb_fn`).
"""

from __future__ import annotations

import keras
import tensorflow as tf


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy, TensorFlow and Keras with `seed`; with `deterministic`, also ask
    TensorFlow for deterministic kernels (`enable_op_determinism`), otherwise switch them off."""
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()  # not exported by tf.config; the switch is global


def op_determinism_enabled() -> bool:
    """Whether TensorFlow currently runs deterministic kernels."""
    from tensorflow.python.framework import config as tf_config

    return bool(tf_config.is_op_determinism_enabled())
