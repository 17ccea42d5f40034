"""Adversarial attacks: ART attacks by name (`registry`) for evaluation, TF-graph PGD, FGSM-RS and
TRADES attacks (`tf_attacks`) for training and validation.

The names below are loaded on first use, so that importing `robustlab.attacks.registry` (the
command line does, to check options) does not import TensorFlow."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ATTACK_NAMES": "registry",
    "make_attack": "registry",
    "make_classifier": "art_factory",
    "PerturbFn": "tf_attacks",
    "make_perturb_fn": "tf_attacks",
    "pgd_attack": "tf_attacks",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'robustlab.attacks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"robustlab.attacks.{_WHERE[name]}"), name)
