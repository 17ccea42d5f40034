"""Square Attack: gradient-free random search (the masking check beside AutoAttack)."""

from __future__ import annotations

from typing import Any

import numpy as np

from robustlab.attacks.attack import (
    Attack,
    StageEntry,
    check_batch_size,
    check_steps,
    restarts_at_least,
)
from robustlab.attacks.stage import Stage, StageSpec, on_subset
from robustlab.config import EvalConfig


def build_square(
    classifier, *, eps: float, max_iter: int, num_random_init: int, batch_size: int, p_init: float
) -> Any:
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


def _square(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    if not cfg.square_alone:
        return []
    params = (("restarts", 1),)
    return on_subset(cfg, "square", spec.square_queries, params=params, independent=True)


ATTACK = Attack(
    name="square",
    label="Square",
    paper=(
        "Andriushchenko et al. 2020, Square Attack: a query-efficient black-box adversarial "
        "attack via random search (ECCV)"
    ),
    defaults={"max_iter": 5000, "num_random_init": 1, "batch_size": 500, "p_init": 0.8},
    build=build_square,
    position=50,
    checks=(check_steps, check_batch_size, restarts_at_least(1)),
    stages=(
        StageEntry(
            name="square",
            stream_id=5,
            stages=_square,
            metric=lambda cfg: "test/square_acc",
            label=lambda cfg: "Square",
            card=lambda metric: "Square (gradient-free)",
            masking_check=True,
            describe=lambda cfg, spec, n: {
                "library": "ART SquareAttack",
                "queries": spec.square_queries,
                "size": n,
            },
        ),
    ),
)
