"""The experiment's regimes and budgets (light: the command line checks its options with them)."""

from __future__ import annotations

from dataclasses import dataclass

from robustlab.config import MixConfig
from robustlab.errors import ConfigError
from robustlab.regimes import Regime, make_regime

DEFAULT_REGIMES = (
    "vanilla",
    "perturbation",
    "invariance",
    "invariance_target",  # trained on the attack's target labels (the thesis's run 1)
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
        pgd_restarts=1,
        batch_size=64,
        curve_size=50,
        curve_points=3,
    ),
    # a laptop afternoon (under 2 h on 2 cores): short PGD-5 training, full-test-set PGD-40,
    # AutoAttack on a seeded subset as the strong attack
    "default": Budget(
        train_size=0,
        eval_size=0,
        epochs=2,
        ptb_epochs=2,
        inv_epochs=1,
        attack_steps=5,
        autoattack_size=200,
        pgd_restarts=0,
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
