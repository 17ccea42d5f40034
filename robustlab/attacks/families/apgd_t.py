"""APGD-T: targeted APGD with the DLR loss against the runner-up classes (optional stage)."""

from __future__ import annotations

from typing import Any

import numpy as np

from robustlab.attacks.attack import (
    Attack,
    Params,
    StageEntry,
)
from robustlab.attacks.families import apgd
from robustlab.attacks.families.apgd import PAPER, build_apgd
from robustlab.attacks.stage import Stage, StageSpec, on_subset
from robustlab.config import EvalConfig
from robustlab.errors import ConfigError


class TargetedAPGD:
    """APGD-T (Croce & Hein 2020): ART's targeted APGD with the DLR loss against each of the
    `targets` classes the clean logits rank highest after the true one, each run on the examples
    the earlier targets left standing; an example counts as broken once it is misclassified."""

    def __init__(self, classifier, *, eps: float, targets: int, **apgd: Any) -> None:
        _check_targets("apgd_t", eps, {"targets": targets})
        self.classifier, self.eps, self.targets, self.apgd = classifier, eps, int(targets), apgd

    def generate(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y).reshape(-1).astype(np.int64)
        order = np.argsort(-self.classifier.predict(x), axis=1, kind="stable")
        others = np.array([row[row != label] for row, label in zip(order, y, strict=True)])
        x_adv, alive = x.copy(), np.ones(len(y), dtype=bool)
        for k in range(self.targets):
            idx = np.flatnonzero(alive)
            if not len(idx):
                break
            attack = build_apgd(
                self.classifier,
                eps=self.eps,
                loss_type="difference_logits_ratio",
                targeted=True,
                **self.apgd,
            )
            adv = attack.generate(x[idx], y=others[idx, k]).astype(np.float32)
            broken = self.classifier.predict(adv).argmax(axis=1) != y[idx]
            x_adv[idx[broken]] = adv[broken]
            alive[idx[broken]] = False
        return x_adv


def _check_targets(name: str, eps: float, p: Params) -> None:
    if not 1 <= int(p["targets"]) <= 9:
        raise ConfigError(f"attack {name!r}: targets must lie in 1..9, got {p['targets']}")


def _apgd_t(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    # beside AutoAttack: the worst case over PGD and APGD-T alone
    return on_subset(cfg, "apgd_t", spec.autoattack_steps, independent=True)


ATTACK = Attack(
    name="apgd_t",
    label="APGD-T",
    paper=PAPER,
    defaults={**apgd.DEFAULTS, "targets": 9},
    build=TargetedAPGD,
    position=60,
    checks=(*apgd.CHECKS, _check_targets),
    stages=(
        StageEntry(
            name="apgd_t",
            stream_id=6,
            stages=_apgd_t,
            metric=lambda cfg: "test/apgd_t_acc",
            label=lambda cfg: "APGD-T",
            card=lambda metric: "APGD-T",
            describe=lambda cfg, spec, n: {
                "library": "ART AutoProjectedGradientDescent (targeted, DLR loss)",
                "targets": 9,
                "apgd_steps": spec.autoattack_steps,
                "size": n,
            },
            optional=True,
        ),
    ),
)
