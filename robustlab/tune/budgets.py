"""The search space (the mixture simplex, optionally learning rate and eps warm-up) and budgets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna

from robustlab.config import TUNE_BUDGETS, MixConfig, TuneConfig

MIX_KEYS = ("clean", "ptb", "inv")
U_LOW = 1e-6  # u_k in (0, 1): -log(u_k) stays finite
LR_RANGE = (1e-4, 3e-3)
WARMUP_RANGE = (0.0, 2.0)
DEFAULT_LR = 1e-3
DEFAULT_WARMUP = 1.0


@dataclass(frozen=True)
class TuneBudget:
    """Compute per trial."""

    train_size: int
    epochs: int
    attack_steps: int  # PGD steps of the training attack
    batch_size: int
    val_attack_size: int  # validation images attacked (PGD-10) for val/pgd_acc and sel/pgd_acc
    eval_size: int  # the runner's final clean test evaluation (not used for selection)
    prune_startup: int  # scalar mode: trials before the pruner acts
    prune_warmup: int  # scalar mode: epochs before a trial can be pruned


BUDGETS: dict[str, TuneBudget] = {
    # CI: every code path on a tiny real slice
    "smoke": TuneBudget(
        train_size=512,
        epochs=1,
        attack_steps=2,
        batch_size=64,
        val_attack_size=100,
        eval_size=200,
        prune_startup=1,
        prune_warmup=0,
    ),
    # this 2-core machine: 10k training images, 3 epochs of PGD-5 mixture training per trial
    "default": TuneBudget(
        train_size=10_000,
        epochs=3,
        attack_steps=5,
        batch_size=128,
        val_attack_size=500,
        eval_size=2_000,
        prune_startup=4,
        prune_warmup=1,
    ),
}
assert tuple(BUDGETS) == TUNE_BUDGETS


def simplex_point(u: np.ndarray) -> np.ndarray:
    """Uniform samples u_k in (0, 1) -> a uniform point on the simplex (Optuna FAQ):
    x_k = -log(u_k), mix = x / sum(x)."""
    x = -np.log(np.asarray(u, dtype=np.float64))
    return x / x.sum()


BETA_RANGE = (1.0, 10.0)  # TRADES' beta: larger is more robust (Zhang et al. 2019)


def suggest_beta(trial: optuna.Trial, cfg: TuneConfig) -> float:
    """TRADES' beta: searched (log-uniform on BETA_RANGE) when `cfg.tune_beta`, else fixed."""
    return (
        trial.suggest_float("trades_beta", *BETA_RANGE, log=True)
        if cfg.tune_beta
        else cfg.trades_beta
    )


def suggest(trial: optuna.Trial, cfg: TuneConfig) -> tuple[MixConfig, float, float]:
    """The trial's (mixture, learning_rate, eps_warmup); the mixture is logged as user attrs."""
    u = [trial.suggest_float(f"u_{k}", U_LOW, 1.0) for k in MIX_KEYS]
    mix = simplex_point(np.array(u))
    shares = {k: float(v) for k, v in zip(MIX_KEYS, mix, strict=True)}
    for k, v in shares.items():
        trial.set_user_attr(f"mix_{k}", v)
    lr = trial.suggest_float("learning_rate", *LR_RANGE, log=True) if cfg.tune_lr else DEFAULT_LR
    warmup = trial.suggest_float("eps_warmup", *WARMUP_RANGE) if cfg.tune_warmup else DEFAULT_WARMUP
    return MixConfig(**shares), lr, warmup
