"""Regimes are configurations of the one training loop: a list of phases, each a batch mixture."""

from __future__ import annotations

from dataclasses import dataclass

from robustlab.config import MixConfig
from robustlab.errors import ConfigError

REGIMES = ("vanilla", "perturbation", "invariance", "sequential", "joint")
ORDERS = ("ptb_inv", "inv_ptb")


@dataclass(frozen=True)
class Phase:
    name: str  # "clean", "ptb", "inv" or "joint": the nested run / metric prefix
    mix: MixConfig
    epochs: int


@dataclass(frozen=True)
class Regime:
    name: str
    phases: tuple[Phase, ...]

    @property
    def uses_inv(self) -> bool:
        return any(p.mix.inv > 0 for p in self.phases)

    @property
    def uses_ptb(self) -> bool:
        return any(p.mix.ptb > 0 for p in self.phases)

    @property
    def nested(self) -> bool:
        """Multi-phase regimes log one nested MLflow run per phase."""
        return len(self.phases) > 1


def make_regime(
    name: str,
    *,
    epochs: int = 5,
    mix: MixConfig | None = None,
    mix_inv: float = 0.25,
    order: str = "ptb_inv",
    ptb_epochs: int = 5,
    inv_epochs: int = 5,
) -> Regime:
    """Build a regime from its entry point's parameters; raises ConfigError for unknown names."""
    if name in ("invariance", "sequential") and not 0 < mix_inv <= 1:
        raise ConfigError(
            f"mix_inv must lie in (0, 1] for the {name} regime (its invariance phase trains on "
            f"invariance examples), got {mix_inv}"
        )
    ptb_phase = Phase("ptb", MixConfig(clean=0.0, ptb=1.0, inv=0.0), epochs)
    inv_mix = MixConfig(clean=1.0 - mix_inv, ptb=0.0, inv=mix_inv)
    if name == "vanilla":
        phases = (Phase("clean", MixConfig(), epochs),)
    elif name == "perturbation":
        phases = (ptb_phase,)
    elif name == "invariance":
        phases = (Phase("inv", inv_mix, epochs),)
    elif name == "sequential":
        if order not in ORDERS:
            raise ConfigError(f"unknown order {order!r}; choose one of {list(ORDERS)}")
        ptb = Phase("ptb", ptb_phase.mix, ptb_epochs)
        inv = Phase("inv", inv_mix, inv_epochs)
        phases = (ptb, inv) if order == "ptb_inv" else (inv, ptb)
    elif name == "joint":
        phases = (Phase("joint", mix or MixConfig(clean=0.4, ptb=0.4, inv=0.2), epochs),)
    else:
        raise ConfigError(f"unknown regime {name!r}; choose one of {list(REGIMES)}")
    for phase in phases:
        phase.mix.validate()
        if phase.epochs < 0 and name == "sequential":
            raise ConfigError(f"{phase.name}_epochs must be >= 0, got {phase.epochs}")
        if phase.epochs < 0:
            raise ConfigError(f"{phase.name} epochs must be >= 0, got {phase.epochs}")
    return Regime(name, phases)


def check_eps_warmup(regime: Regime, eps_warmup: float) -> None:
    """The eps ramp must end within every adversarial phase, or training never reaches eps."""
    for phase in regime.phases:
        if phase.mix.ptb > 0 and phase.epochs > 0 and eps_warmup > phase.epochs:
            raise ConfigError(
                f"eps_warmup={eps_warmup:g} epochs is longer than the {phase.name} phase "
                f"({phase.epochs} epochs), so eps would never be reached; lower eps_warmup "
                "or train longer"
            )
