"""ART's attacks on an ART `TensorFlowV2Classifier` wrapping the model's logits.

The builders take ART's parameter names, already checked and defaulted by the attack registry
(`robustlab.attacks.registry.make_attack`, the way to get an attack by name).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from contextlib import contextmanager
from typing import Any

import numpy as np

from robustlab.attacks.checks import check_logits
from robustlab.errors import ConfigError


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


def make_classifier(model):
    """ART `TensorFlowV2Classifier` on the model's logits, clip values (0, 1), MNIST shape.

    A model that outputs probabilities is refused (ConfigError), see `checks.check_logits`.
    """
    import keras
    from art.estimators.classification import TensorFlowV2Classifier

    check_logits(model)

    return TensorFlowV2Classifier(
        model=model,
        nb_classes=10,
        input_shape=(28, 28, 1),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0),
    )


def build_fgsm(classifier, *, eps: float, num_random_init: int, batch_size: int, **_: Any):
    from art.attacks.evasion import FastGradientMethod

    return FastGradientMethod(
        classifier,
        norm=np.inf,
        eps=eps,
        eps_step=eps,
        num_random_init=int(num_random_init),
        batch_size=int(batch_size),
    )


def build_pgd(
    classifier, *, eps: float, max_iter: int, eps_step: float, num_random_init: int, batch_size: int
):
    from art.attacks.evasion import ProjectedGradientDescent

    return ProjectedGradientDescent(
        classifier,
        norm=np.inf,
        eps=eps,
        eps_step=float(eps_step),
        max_iter=int(max_iter),
        num_random_init=int(num_random_init),
        batch_size=int(batch_size),
        verbose=False,
    )


def build_apgd(
    classifier,
    *,
    eps: float,
    max_iter: int,
    eps_step: float,
    num_random_init: int,
    batch_size: int,
    loss_type: str,
    targeted: bool = False,
):
    """ART's APGD with `loss_type`'s loss computed by a compiled estimator (ART uses the
    estimator's own loss when its `loss_type` is None)."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    from robustlab.attacks.compiled_estimator import LOSS_TYPES, CompiledLossClassifier

    if loss_type not in LOSS_TYPES:
        raise ConfigError(
            f"apgd: loss_type must be 'cross_entropy' or 'difference_logits_ratio', got {loss_type!r}"
        )
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
        eps_step=float(eps_step),
        max_iter=int(max_iter),
        targeted=targeted,
        nb_random_init=int(num_random_init),
        batch_size=int(batch_size),
        loss_type=None,
        verbose=False,
    )
    apgd.loss_type = loss_type  # ART reads it only in __init__; keep it for repr/inspection
    return apgd


def build_square(
    classifier,
    *,
    eps: float,
    max_iter: int,
    num_random_init: int,
    batch_size: int,
    p_init: float,
    **_: Any,
):
    from art.attacks.evasion import SquareAttack

    return SquareAttack(
        classifier,
        norm=np.inf,
        eps=eps,
        max_iter=int(max_iter),
        p_init=float(p_init),
        nb_restarts=int(num_random_init),
        batch_size=int(batch_size),
        verbose=False,
    )


def build_autoattack(
    classifier,
    *,
    eps: float,
    max_iter: int,
    eps_step: float,
    num_random_init: int,
    batch_size: int,
    square_queries: int,
    version: str,
):
    """`version="standard"`: ART `AutoAttack` over APGD-CE, APGD-DLR and Square, each on the
    examples still robust; `version="art"`: ART's own default list (far slower)."""
    AutoAttack = _sequential_autoattack_class()  # noqa: N806
    if version == "art":
        return AutoAttack(
            classifier, norm=np.inf, eps=eps, eps_step=eps_step, batch_size=int(batch_size)
        )
    if version != "standard":
        raise ConfigError(f"autoattack: version must be 'standard' or 'art', got {version!r}")
    if int(square_queries) < 1:
        raise ConfigError(f"autoattack: square_queries must be >= 1, got {square_queries}")
    common = dict(eps=eps, max_iter=max_iter, eps_step=eps_step, batch_size=batch_size)
    attacks = [
        build_apgd(classifier, num_random_init=num_random_init, loss_type=loss, **common)
        for loss in ("cross_entropy", "difference_logits_ratio")
    ]
    attacks.append(
        build_square(
            classifier,
            eps=eps,
            max_iter=square_queries,
            num_random_init=1,
            batch_size=batch_size,
            p_init=0.8,
        )
    )
    return AutoAttack(
        classifier,
        norm=np.inf,
        eps=eps,
        eps_step=eps_step,
        attacks=attacks,
        batch_size=int(batch_size),
    )
