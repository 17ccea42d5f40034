"""The experiment's regimes and budgets (light: the command line checks its options with them)."""

from __future__ import annotations

from dataclasses import dataclass

from robustlab.config import MixConfig
from robustlab.errors import ConfigError
from robustlab.regimes import Regime, make_regime

DEFAULT_REGIMES = (
    "vanilla",
    "perturbation",
    "invariance",  # the thesis set with human labels (the thesis's run 2)
    "invariance_target",  # the same examples with the attack's target labels (the thesis's run 1)
    "sequential_ptb_inv",
    "sequential_inv_ptb",
    "joint",
)


@dataclass(frozen=True)
class Budget:
    """How much compute one regime × seed gets."""

    train_size: int
    eval_size: int
    epochs: int  # single-phase regimes
    ptb_epochs: int  # sequential phases
    inv_epochs: int
    attack_steps: int
    autoattack_size: int
    pgd_restarts: int
    # PGD images per unit (0: every shared test image), sized so that the paired PGD-40
    # comparison's planned MDE is at most half its margin (robustlab.experiment.design)
    pgd_size: int = 0
    batch_size: int = 128
    patience: int = 3
    curve_size: int = 1000
    curve_points: int = 9
    square_queries: int = 1000
    pgd_engine: str = "robustlab"  # evaluation PGD: in-graph (same result as ART, about 2x faster)
    square_alone: bool = False  # Square beside AutoAttack (which runs Square too); `full`: True


BUDGETS: dict[str, Budget] = {
    # CI: every code path on a tiny real slice, in a few minutes
    "smoke": Budget(
        train_size=512,
        eval_size=200,
        epochs=1,
        ptb_epochs=1,
        inv_epochs=1,
        attack_steps=2,
        autoattack_size=0,
        pgd_restarts=0,  # as `default`: the restarts' path is `evaluate`'s, tested there
        pgd_size=50,  # the PGD subset path, as `default` takes it
        batch_size=64,
        curve_size=25,
        curve_points=3,
    ),
    # a laptop afternoon on 2 cores: short PGD-5 training, clean accuracy on every shared test
    # image, PGD-40 on a fixed subset of 2,000 of them, AutoAttack on 200 (fold-0 models)
    "default": Budget(
        train_size=0,
        eval_size=0,
        epochs=2,
        ptb_epochs=2,
        inv_epochs=1,
        attack_steps=5,
        autoattack_size=200,
        pgd_restarts=0,
        pgd_size=2000,
        curve_size=300,
        curve_points=5,
    ),
    # Madry-style: PGD-40 training, full strong-attack evaluation
    "full": Budget(
        train_size=0,
        eval_size=0,
        epochs=30,
        ptb_epochs=30,
        inv_epochs=10,
        attack_steps=40,
        autoattack_size=1000,
        pgd_restarts=10,
        patience=5,
        square_queries=5000,
        pgd_engine="art",
        square_alone=True,
    ),
}


def parse_regimes(text: str) -> list[str]:
    """Comma-separated regime labels (`sequential:ptb_inv` spelled either way); ConfigError."""
    names = [t.strip().replace(":", "_").replace(" ", "_") for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in DEFAULT_REGIMES]
    if unknown or not names:
        raise ConfigError(
            f"unknown regime(s) {unknown or text!r}; choose from {list(DEFAULT_REGIMES)}"
        )
    return names


def check_budget(budget: str) -> Budget:
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {list(BUDGETS)}")
    return BUDGETS[budget]


THESIS_SET = "thesis_linf_eps0.3"
# Claim 1 compares human with target labels on the same examples: the thesis set is the only one
# with target labels, so both of its regimes train and validate on that set's examples alone (and
# predict every held-out example of the pool); every other regime trains on the whole pool.
MATCHED_TRAIN_SETS = {"invariance": (THESIS_SET,), "invariance_target": (THESIS_SET,)}


# A regime whose first phase is another regime's whole training: `sequential_ptb_inv`'s PGD phase
# is the `perturbation` regime of the same seed (same data, epochs, attack and early stopping), so
# its fold models fine-tune that seed's perturbation model on invariance examples instead of
# training the PGD phase again once per fold; claim 2 then compares the retrained model with the
# very model it started from.
FIRST_PHASE_FROM = {"sequential_ptb_inv": "perturbation"}


def train_sets_for(label: str) -> tuple[str, ...] | None:
    """The pool sets a regime trains on (None: every set of the pool)."""
    return MATCHED_TRAIN_SETS.get(label)


def regime_for(label: str, b: Budget, mix: MixConfig | None = None) -> tuple[Regime, str]:
    """The Regime behind an experiment label, and its invariance label source."""
    if label.startswith("sequential_"):
        order = label.removeprefix("sequential_")
        return make_regime(
            "sequential", order=order, ptb_epochs=b.ptb_epochs, inv_epochs=b.inv_epochs
        ), "human"
    if label == "invariance_target":
        return make_regime("invariance", epochs=b.epochs), "target"
    return make_regime(label, epochs=b.epochs, mix=mix), "human"
