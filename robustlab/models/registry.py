"""Architectures by name. Every model maps float32 (N, 28, 28, 1) in [0, 1] to logits."""

from __future__ import annotations

from collections.abc import Callable

import keras

from robustlab.errors import ConfigError

ModelBuilder = Callable[[], keras.Model]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make a builder available to `build_model(name)` and the `model` parameter."""

    def wrap(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = builder
        return builder

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, precision: str = "float32") -> keras.Model:
    """A fresh, uncompiled model that outputs logits, built under the Keras dtype policy of
    `precision` (robustlab.precision; the global policy is restored afterwards). Builders give
    their logits layer `dtype="float32"`, so logits and loss stay float32 under mixed_bfloat16."""
    from robustlab.precision import precision_scope

    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose one of {available_models()}")
    with precision_scope(precision):
        return _REGISTRY[name]()
