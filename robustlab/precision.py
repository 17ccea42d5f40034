"""Training precision: float32 or Keras' mixed_bfloat16, resolved per machine; float32 copies.

`mixed_bfloat16` computes convolutions and dense layers in bfloat16 with float32 variables;
robustlab keeps the logits layer (and so the loss and the attack's cross-entropy) in float32.
bfloat16 has float32's exponent range, so no loss scaling is needed (Keras 3's
`LossScaleOptimizer` is for float16 only). Everything that judges a model (evaluation,
invariance metrics, tuning's selection metrics, the logged model) uses `float32_copy(model)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from robustlab.errors import ConfigError

if TYPE_CHECKING:
    import keras

FLOAT32 = "float32"
BF16 = "mixed_bfloat16"
AUTO = "auto"
PRECISIONS = (AUTO, FLOAT32, BF16)
# CPU flags (Linux /proc/cpuinfo) under which oneDNN runs bfloat16 natively
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def check_precision(precision: str) -> None:
    """One-line ConfigError for a precision robustlab does not know."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision must be one of {list(PRECISIONS)} (auto: mixed_bfloat16 where the CPU "
            f"has {' or '.join(BF16_CPU_FLAGS)}, else float32), got {precision!r}"
        )


@cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises native bfloat16 (AVX512-BF16 or AMX-BF16); False if unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return any(f in flags for f in BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str) -> str:
    """`float32` or `mixed_bfloat16`: `auto` becomes mixed_bfloat16 only on a bf16-capable CPU
    (measured 1.9-2.9x faster per adversarial-training batch there; see bench_adv_training.py)."""
    check_precision(precision)
    if precision != AUTO:
        return precision
    return BF16 if cpu_has_bf16() else FLOAT32


@contextmanager
def precision_scope(precision: str) -> Iterator[None]:
    """Keras' global dtype policy set to `precision` (resolved) inside the block, restored after."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(resolve_precision(precision))
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def model_precision(model: keras.Model) -> str:
    """`mixed_bfloat16` when any layer computes in bfloat16, else `float32`."""
    return BF16 if any(_compute_dtype(layer) == "bfloat16" for layer in model.layers) else FLOAT32


def _compute_dtype(layer) -> str | None:
    policy = getattr(layer, "dtype_policy", None)
    return getattr(policy, "compute_dtype", None)


def with_precision(model: keras.Model, precision: str) -> keras.Model:
    """A copy of `model` (same architecture and weights) whose layers use `precision`; the layers
    that produce the model's outputs stay float32 (logits and loss in float32).

    `float32` gives the judging copy: every layer float32, weights cast to float32, so it loads
    and serves in float32 whatever the original was trained in.
    """
    import keras
    import numpy as np

    precision = resolve_precision(precision)
    outputs = {id(layer) for layer in model.layers if any(layer.output is t for t in model.outputs)}

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = FLOAT32 if id(layer) in outputs else precision
        return layer.__class__.from_config(config)

    with precision_scope(precision):
        copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(
        [
            np.asarray(w, dtype=v.dtype)
            for w, v in zip(model.get_weights(), copy.weights, strict=True)
        ]
    )
    return copy


def float32_copy(model: keras.Model) -> keras.Model:
    """The float32 judging copy of a trained model (see `with_precision`)."""
    return with_precision(model, FLOAT32)
