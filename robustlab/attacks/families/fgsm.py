"""FGSM: one signed-gradient step of size eps from an optional random start (no stage)."""

from __future__ import annotations

from typing import Any

import numpy as np

from robustlab.attacks.attack import Attack, check_batch_size, restarts_at_least


def build_fgsm(classifier, *, eps: float, num_random_init: int, batch_size: int) -> Any:
    from art.attacks.evasion import FastGradientMethod

    return FastGradientMethod(
        classifier,
        norm=np.inf,
        eps=eps,
        eps_step=eps,
        num_random_init=int(num_random_init),
        batch_size=int(batch_size),
    )


ATTACK = Attack(
    name="fgsm",
    label="FGSM",
    paper=(
        "Goodfellow, Shlens & Szegedy 2015, Explaining and Harnessing Adversarial Examples (ICLR)"
    ),
    defaults={"num_random_init": 0, "batch_size": 500},
    build=build_fgsm,
    position=10,
    checks=(check_batch_size, restarts_at_least(0)),
)
