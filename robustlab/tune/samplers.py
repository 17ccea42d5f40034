"""The sampler and pruner of a tune worker."""

from __future__ import annotations

import optuna

from robustlab.config import TuneConfig
from robustlab.errors import ConfigError


def make_sampler(cfg: TuneConfig, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler for one worker (seeded per worker so workers do not propose the same points)."""
    seed = cfg.seed * 1000 + worker
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if cfg.sampler == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    check_gp_available()
    return optuna.samplers.GPSampler(seed=seed)


def check_gp_available() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError(
            "sampler=gp needs PyTorch (CPU), which is not installed; "
            "choose sampler=tpe, nsgaii or random (or pip install torch)"
        ) from None


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    from robustlab.tune.budgets import BUDGETS

    b = BUDGETS[cfg.budget]
    if cfg.objective != "scalar" or cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(b.epochs, 1))
    return optuna.pruners.MedianPruner(
        n_startup_trials=b.prune_startup, n_warmup_steps=b.prune_warmup
    )
