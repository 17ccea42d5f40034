"""APGD (Auto-PGD): step-size-free PGD with the cross-entropy or DLR loss (no stage of its own;
AutoAttack and APGD-T run it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from robustlab.attacks.attack import (
    Attack,
    check_batch_size,
    check_step_size,
    check_steps,
    eps_step,
    one_of,
    restarts_at_least,
)

LOSS_TYPES = ("cross_entropy", "difference_logits_ratio")
PAPER = (
    "Croce & Hein 2020, Reliable Evaluation of Adversarial Robustness with an Ensemble of "
    "Diverse Parameter-free Attacks (ICML)"
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
) -> Any:
    """ART's APGD with `loss_type`'s loss computed by a compiled estimator (ART uses the
    estimator's own loss when its `loss_type` is None)."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    from robustlab.attacks.compiled_estimator import CompiledLossClassifier

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


# APGD's parameters and their checks, shared by the attacks built on it (APGD-T, AutoAttack)
DEFAULTS = {"max_iter": 100, "eps_step": eps_step, "num_random_init": 1, "batch_size": 500}
CHECKS = (check_steps, check_step_size, check_batch_size, restarts_at_least(1))

ATTACK = Attack(
    name="apgd",
    label="APGD",
    paper=PAPER,
    defaults={**DEFAULTS, "loss_type": "cross_entropy"},
    build=build_apgd,
    position=30,
    checks=(*CHECKS, one_of("loss_type", LOSS_TYPES)),
)
