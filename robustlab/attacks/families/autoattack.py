"""AutoAttack (standard): ART's `AutoAttack` over APGD-CE, APGD-DLR and Square, each on the
examples still robust; the strong attack of every evaluation."""

from __future__ import annotations

import importlib.util
import sys
import types
from contextlib import contextmanager
from typing import Any

import numpy as np

from robustlab.attacks.attack import (
    Attack,
    Params,
    StageEntry,
    one_of,
)
from robustlab.attacks.families import apgd
from robustlab.attacks.families.apgd import PAPER, build_apgd
from robustlab.attacks.families.square import build_square
from robustlab.attacks.stage import Stage, StageSpec, on_subset
from robustlab.config import EvalConfig
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
) -> Any:
    """`version="standard"`: ART `AutoAttack` over APGD-CE, APGD-DLR and Square, each on the
    examples still robust; `version="art"`: ART's own default list (far slower)."""
    AutoAttack = _sequential_autoattack_class()  # noqa: N806
    if version == "art":
        return AutoAttack(
            classifier, norm=np.inf, eps=eps, eps_step=eps_step, batch_size=int(batch_size)
        )
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


def _check_square_queries(name: str, eps: float, p: Params) -> None:
    if int(p["square_queries"]) < 1:
        raise ConfigError(
            f"attack {name!r}: square_queries must be >= 1, got {p['square_queries']}"
        )


def _autoattack(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    params = (("square_queries", spec.square_queries),)
    return on_subset(cfg, "autoattack", spec.autoattack_steps, params=params)


ATTACK = Attack(
    name="autoattack",
    label="AutoAttack",
    paper=PAPER,
    defaults={**apgd.DEFAULTS, "square_queries": 5000, "version": "standard"},
    build=build_autoattack,
    position=40,
    checks=(
        *apgd.CHECKS,
        one_of("version", ("standard", "art")),
        _check_square_queries,
    ),
    stages=(
        StageEntry(
            name="autoattack",
            stream_id=4,
            stages=_autoattack,
            metric=lambda cfg: "test/autoattack_acc",
            label=lambda cfg: "AutoAttack",
            card=lambda metric: "AutoAttack (APGD-CE, APGD-DLR, Square)",
            masking_check=True,
            describe=lambda cfg, spec, n: {
                "library": "ART AutoAttack",
                "attacks": ["APGD-CE", "APGD-DLR", "Square"],
                "apgd_steps": spec.autoattack_steps,
                "square_queries": spec.square_queries,
                "size": n,
            },
            extra_metrics=("test/pgd_subset_acc",),
        ),
    ),
)
