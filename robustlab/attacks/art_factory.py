"""ART attacks by name, on an ART `TensorFlowV2Classifier` wrapping the model's logits.

Every evaluation number robustlab reports comes from these ART attacks; the hand-written TF
attacks in `tf_attacks` are for training and per-epoch validation only.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from contextlib import contextmanager
from typing import Any

import keras
import numpy as np

from robustlab.attacks.checks import check_logits
from robustlab.config import AttackConfig
from robustlab.errors import ConfigError

ATTACK_NAMES = ("fgsm", "pgd", "apgd", "autoattack", "square")

# parameter aliases: robustlab name -> ART name
_ALIASES = {
    "steps": "max_iter",
    "step_size": "eps_step",
    "restarts": "num_random_init",
}
_ALLOWED: dict[str, set[str]] = {
    "fgsm": {"num_random_init", "batch_size"},
    "pgd": {"max_iter", "eps_step", "num_random_init", "batch_size"},
    "apgd": {"max_iter", "eps_step", "num_random_init", "batch_size", "loss_type"},
    "autoattack": {
        "max_iter",
        "eps_step",
        "num_random_init",
        "batch_size",
        "square_queries",
        "version",
    },
    "square": {"max_iter", "num_random_init", "batch_size", "p_init"},
}


@contextmanager
def _without_multiprocess():
    """ART's `AutoAttack.generate` imports `multiprocess` (not installed) even when it runs
    sequentially (parallel_pool_size=0, our case, where the module is never used): stand in an
    empty module for the duration of the call."""
    if "multiprocess" in sys.modules or importlib.util.find_spec("multiprocess") is not None:
        yield
        return
    sys.modules["multiprocess"] = types.ModuleType("multiprocess")
    try:
        yield
    finally:
        sys.modules.pop("multiprocess", None)


def _sequential_autoattack_class():
    from art.attacks.evasion import AutoAttack

    class SequentialAutoAttack(AutoAttack):
        """ART `AutoAttack`, unchanged, run sequentially without the `multiprocess` package."""

        def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
            if self.parallel_pool_size > 0:
                raise ConfigError(
                    "parallel AutoAttack needs the 'multiprocess' package; use parallel_pool_size=0"
                )
            with _without_multiprocess():
                return super().generate(x, y, **kwargs)

    return SequentialAutoAttack


def make_classifier(model: keras.Model):
    """ART `TensorFlowV2Classifier` on the model's logits, clip values (0, 1), MNIST shape.

    A model that outputs probabilities is refused (ConfigError), see `checks.check_logits`.
    """
    from art.estimators.classification import TensorFlowV2Classifier

    check_logits(model)

    return TensorFlowV2Classifier(
        model=model,
        nb_classes=10,
        input_shape=(28, 28, 1),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0),
    )


def _normalise(name: str, params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        art_key = _ALIASES.get(key, key)
        if art_key in out:
            raise ConfigError(
                f"attack {name!r}: parameter {key!r} given twice (also as {art_key!r})"
            )
        out[art_key] = value
    unknown = sorted(set(out) - _ALLOWED[name])
    if unknown:
        raise ConfigError(
            f"attack {name!r}: unknown parameter(s) {unknown}; allowed: {sorted(_ALLOWED[name])}"
        )
    return out


def make_attack(name: str, classifier, *, eps: float, **params: Any):
    """An ART L-inf evasion attack by name: fgsm | pgd | apgd | autoattack | square.

    Parameters (robustlab or ART spelling): `steps`/`max_iter`, `step_size`/`eps_step`,
    `restarts`/`num_random_init` (random starts; for PGD/APGD the worst case is kept),
    `batch_size` (default 500). Defaults: pgd 40 steps of 0.01 with one random start;
    apgd 100 steps, initial step 2*eps, 1 start, `loss_type` "cross_entropy" (or
    "difference_logits_ratio"); square `max_iter` 5000 queries, 1 restart.
    autoattack: `version="standard"` (default) runs ART `AutoAttack` over APGD-CE, APGD-DLR
    (100 steps each) and Square (`square_queries`, default 5000), each attacking only the
    examples still robust; `version="art"` uses ART's own default list (5 restarts each and
    DeepFool, far slower). Bad values raise ConfigError.
    """
    from art.attacks.evasion import (
        AutoProjectedGradientDescent,
        FastGradientMethod,
        ProjectedGradientDescent,
        SquareAttack,
    )

    key = str(name).lower()
    if key not in ATTACK_NAMES:
        raise ConfigError(f"unknown attack {name!r}; choose one of {', '.join(ATTACK_NAMES)}")
    p = _normalise(key, params)
    batch_size = int(p.get("batch_size", 500))
    max_iter = int(p.get("max_iter", {"pgd": 40, "square": 5000}.get(key, 100)))
    eps_step = float(p.get("eps_step", 0.01 if key == "pgd" else 2.0 * eps if eps > 0 else 0.01))
    restarts = int(p.get("num_random_init", 0 if key == "fgsm" else 1))
    # one-line errors for the ranges shared by all attacks
    AttackConfig(eps=float(eps), steps=max_iter, step_size=eps_step).validate()
    if batch_size < 1:
        raise ConfigError(f"attack {name!r}: batch_size must be >= 1, got {batch_size}")
    min_restarts = 0 if key in ("fgsm", "pgd") else 1
    if restarts < min_restarts:
        raise ConfigError(f"attack {name!r}: restarts must be >= {min_restarts}, got {restarts}")
    eps = float(eps)

    if key == "fgsm":
        return FastGradientMethod(
            classifier,
            norm=np.inf,
            eps=eps,
            eps_step=eps,
            num_random_init=restarts,
            batch_size=batch_size,
        )
    if key == "pgd":
        return ProjectedGradientDescent(
            classifier,
            norm=np.inf,
            eps=eps,
            eps_step=eps_step,
            max_iter=max_iter,
            num_random_init=restarts,
            batch_size=batch_size,
            verbose=False,
        )
    if key == "apgd":
        from robustlab.attacks.compiled_estimator import LOSS_TYPES, CompiledLossClassifier

        loss_type = p.get("loss_type", "cross_entropy")
        if loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"apgd: loss_type must be 'cross_entropy' or 'difference_logits_ratio', got {loss_type!r}"
            )
        # the same loss as ART's `loss_type`, computed by a compiled estimator (ART uses the
        # estimator's own loss when loss_type is None)
        estimator = CompiledLossClassifier(
            classifier.model,
            loss_type,
            nb_classes=classifier.nb_classes,
            input_shape=classifier.input_shape,
        )
        apgd = AutoProjectedGradientDescent(
            estimator,
            norm=np.inf,
            eps=eps,
            eps_step=eps_step,
            max_iter=max_iter,
            nb_random_init=restarts,
            batch_size=batch_size,
            loss_type=None,
            verbose=False,
        )
        apgd.loss_type = loss_type  # ART reads it only in __init__; keep it for repr/inspection
        return apgd
    if key == "square":
        return SquareAttack(
            classifier,
            norm=np.inf,
            eps=eps,
            max_iter=max_iter,
            p_init=float(p.get("p_init", 0.8)),
            nb_restarts=restarts,
            batch_size=batch_size,
            verbose=False,
        )
    # autoattack
    AutoAttack = _sequential_autoattack_class()  # noqa: N806
    version = p.get("version", "standard")
    if version == "art":
        return AutoAttack(
            classifier, norm=np.inf, eps=eps, eps_step=eps_step, batch_size=batch_size
        )
    if version != "standard":
        raise ConfigError(f"autoattack: version must be 'standard' or 'art', got {version!r}")
    square_queries = int(p.get("square_queries", 5000))
    if square_queries < 1:
        raise ConfigError(f"autoattack: square_queries must be >= 1, got {square_queries}")
    attacks = [
        make_attack(
            "apgd",
            classifier,
            eps=eps,
            steps=max_iter,
            step_size=eps_step,
            restarts=restarts,
            batch_size=batch_size,
            loss_type=loss,
        )
        for loss in ("cross_entropy", "difference_logits_ratio")
    ]
    attacks.append(
        make_attack(
            "square", classifier, eps=eps, steps=square_queries, restarts=1, batch_size=batch_size
        )
    )
    return AutoAttack(
        classifier, norm=np.inf, eps=eps, eps_step=eps_step, attacks=attacks, batch_size=batch_size
    )
