"""CW-L∞: ART's Carlini-Wagner L∞ attack, its result projected onto the L∞ ε-ball (optional
stage on the AutoAttack subset's PGD survivors, beside AutoAttack like APGD-T).

ART's `CarliniLInfMethod` searches the smallest L∞ perturbation that misclassifies, whatever ε:
its result may lie outside the ε-ball. `ClippedCarliniLInf` projects it onto the ball around x
and [0, 1], so an example counts as broken only if it is misclassified within ε.

Cost and strength: ART runs it one example at a time, eagerly (a few seconds per example per
iteration on a 2-core CPU), and optimises in tanh space, where MNIST's many pixels at exactly 0
or 1 hardly move: on the tests' FGSM-RS-trained model it found no adversarial at any L∞ size
for 4 clean test images (up to 10 iterations, learning rate up to 0.5). It is an extra,
independent check, not a stronger attack than AutoAttack.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from robustlab.attacks.attack import Attack, Params, StageEntry, check_batch_size, check_steps
from robustlab.attacks.stage import Stage, StageSpec, on_subset
from robustlab.config import EvalConfig
from robustlab.errors import ConfigError


def project(x_adv: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """`x_adv` clipped to the L∞ ball of radius eps around `x` and to [0, 1], float32."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.clip(x_adv, x - eps, x + eps), 0.0, 1.0).astype(np.float32)


class ClippedCarliniLInf:
    """ART `CarliniLInfMethod` (untargeted, on the logits) whose adversarials are projected onto
    the L∞ ε-ball and [0, 1]; `attack` is the ART attack (its raw result: `attack.generate`)."""

    def __init__(self, classifier, *, eps: float, **params: Any) -> None:
        from art.attacks.evasion import CarliniLInfMethod

        self.eps = float(eps)
        self.attack = CarliniLInfMethod(classifier, targeted=False, verbose=False, **params)

    def generate(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return project(self.attack.generate(x, y), x, self.eps)


def _check_search(name: str, eps: float, p: Params) -> None:
    if not float(p["learning_rate"]) > 0 or float(p["confidence"]) < 0:
        raise ConfigError(f"attack {name!r}: learning_rate must be > 0 and confidence >= 0")
    if not 0 < float(p["decrease_factor"]) < 1 or not float(p["const_factor"]) > 1:
        raise ConfigError(f"attack {name!r}: decrease_factor must lie in (0, 1), const_factor > 1")
    if not 0 < float(p["initial_const"]) < float(p["largest_const"]):
        raise ConfigError(f"attack {name!r}: need 0 < initial_const < largest_const")


def _cw_linf(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    # iterations per (tau, const) step of the search: a tenth of APGD's (10 by default)
    steps = max(1, spec.autoattack_steps // 10)
    return on_subset(cfg, "cw_linf", steps, independent=True)


ATTACK = Attack(
    name="cw_linf",
    label="CW-L∞",
    paper="Carlini & Wagner 2017, Towards Evaluating the Robustness of Neural Networks (IEEE S&P)",
    defaults={
        "max_iter": 10,
        "learning_rate": 0.01,
        "confidence": 0.0,
        "initial_const": 1e-5,
        "largest_const": 20.0,
        "const_factor": 2.0,
        "decrease_factor": 0.9,
        "batch_size": 500,
    },
    build=ClippedCarliniLInf,
    position=70,
    checks=(check_steps, check_batch_size, _check_search),
    stages=(
        StageEntry(
            name="cw_linf",
            stages=_cw_linf,
            metric=lambda cfg: "test/cw_linf_acc",
            label=lambda cfg: "CW-L∞",
            card=lambda metric: "CW-L∞ (ART Carlini-Wagner, clipped to the ε-ball)",
            masking_check=True,
            describe=lambda cfg, spec, n: {
                "library": "ART CarliniLInfMethod, projected onto the L-inf eps-ball and [0, 1]",
                "max_iter": max(1, spec.autoattack_steps // 10),
                "size": n,
            },
            optional=True,
        ),
    ),
)
