"""The experiment's design figures, fixed before anything trains: each claim part's planned
minimum detectable effect (MDE) from the planned sample (examples, sources, seeds) and stated
assumptions, and the PGD subset size the margins call for.

The MDE is what a comparison of this size could detect with 80% power at the 5% two-sided level
(normal approximation): (z_0.975 + z_0.8) x SE_planned = 2.80 x SE_planned, with

    SE_planned^2 = sum_g w_g^2 x DISCORDANCE[metric of g] x m_g / n_g  +  2 x SEED_SD^2 / S

- n_g examples in group g (label-changed, label-kept, PGD images), weights w_g (1/2 each for
  balanced accuracy);
- DISCORDANCE: the assumed share of examples on which the two regimes disagree (the variance of
  a paired 0/1 difference is at most that share); not averaged down over seeds, as a hard example
  tends to stay hard;
- m_g: examples per MNIST source in the group (design effect of clustering, every example of a
  source taken as fully correlated: conservative);
- SEED_SD: the assumed standard deviation of a regime's metric from one training seed to the
  next; each regime has its own seed effect, hence the 2.

No observed outcome enters: the same figures are printed before the run and written in the
report. The interval decides the verdict; the planned MDE only qualifies an interval that
straddles its threshold (`robustlab.experiment.verdicts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import norm

Z_POWER = float(norm.ppf(0.975) + norm.ppf(0.80))  # 2.80
DISCORDANCE = {"changed": 0.25, "kept": 0.08, "pgd40": 0.12}
SEED_SD = 0.01
MIN_SEEDS = 3  # fewer training runs per regime: effects are printed, no verdict


@dataclass(frozen=True)
class Group:
    """A planned group of examples: its metric, examples and sources."""

    metric: str  # "changed" | "kept" | "pgd40"
    n: int
    sources: int


def planned_se(groups: list[tuple[float, Group]], seeds: int) -> float:
    """The planned standard error of a weighted paired effect (see the module docstring)."""
    var = sum(
        w * w * DISCORDANCE[g.metric] * (g.n / max(g.sources, 1)) / max(g.n, 1) for w, g in groups
    )
    return math.sqrt(var + 2 * SEED_SD**2 / max(seeds, 1))


def planned_mde(groups: list[tuple[float, Group]], seeds: int) -> float:
    return Z_POWER * planned_se(groups, seeds)


def metric_mde(metric: str, changed: Group, kept: Group, n_pgd: int, seeds: int) -> float:
    """The planned MDE of a paired comparison on `metric` ("changed", "kept", "balanced",
    "pgd40") from the planned groups."""
    groups = {
        "changed": [(1.0, changed)],
        "kept": [(1.0, kept)],
        "balanced": [(0.5, changed), (0.5, kept)],
        "pgd40": [(1.0, Group("pgd40", n_pgd, n_pgd))],  # one test image per source
    }[metric]
    return planned_mde(groups, seeds)


def describe(changed: Group, kept: Group, n_pgd: int, seeds: int) -> str:
    """The planned MDEs as printed before anything trains."""
    mdes = ", ".join(
        f"{m} {metric_mde(m, changed, kept, n_pgd, seeds):.3f}"
        for m in ("changed", "balanced", "pgd40")
    )
    return (
        f"planned MDE at 80% power ({seeds} seed(s); {changed.n} label-changed examples from "
        f"{changed.sources} sources, {kept.n} label-kept from {kept.sources}, {n_pgd} PGD "
        f"images): {mdes}"
    )


def pgd_size_for(margin: float) -> int:
    """PGD images for which the example-sampling part of the paired PGD-40 comparison's planned
    MDE is at most half the margin: 2.80 sqrt(d / n) <= margin / 2 (the seed part, which more
    images cannot lower, comes on top and is reported with it)."""
    return math.ceil(DISCORDANCE["pgd40"] * (2 * Z_POWER / margin) ** 2)
