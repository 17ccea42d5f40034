"""An evaluation stage (one attack run on a subset, possibly on the survivors of the stages before
it), what the stage builders get beside the EvalConfig, and the seed streams stages draw from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from robustlab.config import PGD_ENGINES, EvalConfig, pgd_step_size
from robustlab.errors import ConfigError

SUBSETS = ("all", "autoattack", "curve")
ENGINES = PGD_ENGINES


def derived_stream_id(stream: str) -> int:
    """A stable 32-bit seed-stream id from the stream's name (SHA-256, not Python's `hash`)."""
    return int.from_bytes(hashlib.sha256(f"robustlab.seed-stream:{stream}".encode()).digest()[:4])


def stream_seed(seed: int, stream_id: int, index: int = 0) -> int:
    """The seed of restart (or eps-curve point) `index` of a stream: its own for each stage and
    restart, so R restarts are R independent starts and none depends on what ran before it."""
    words = [int(seed) % 2**32, int(stream_id), int(index)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


@dataclass(frozen=True)
class Stage:
    """One attack of the evaluation.

    `steps`: PGD steps, APGD iterations or Square queries. `restarts`: independent random starts
    of PGD, each on the survivors of the previous one, restart r seeded by
    `attack_seed(seed, seed_stream, seed_index + r)`. `engine`: PGD through robustlab's in-graph
    `pgd_attack` or ART (every other attack is ART's). `params`: further ART parameters of the
    attack. `independent`: attack every clean-correct example of the subset (feeding no
    survivors on); `after_all`: only those that also survived every stage so far on subset "all".
    """

    name: str
    attack: str
    eps: float
    steps: int = 40
    restarts: int = 1
    subset: str = "all"
    engine: str = "robustlab"
    seed_stream: str = "pgd40"
    seed_index: int = 0
    params: tuple[tuple[str, Any], ...] = ()
    independent: bool = False
    after_all: bool = False

    def validate(self) -> Stage:
        """Its shape (the registry checks its attack and seed stream: `registry.check_stage`)."""
        if self.subset not in SUBSETS:
            raise ConfigError(f"stage {self.name}: subset must be one of {SUBSETS}")
        if self.engine not in ENGINES or (self.attack != "pgd" and self.engine != "art"):
            raise ConfigError(
                f"stage {self.name}: engine must be one of {ENGINES} (ART if not PGD)"
            )
        if self.steps < 1 or self.restarts < 1:
            raise ConfigError(f"stage {self.name}: steps and restarts must be >= 1")
        return self

    def art_params(self, batch_size: int) -> dict[str, Any]:
        """The ART attack's parameters for one run (one restart) of this stage."""
        return {"steps": self.steps, "batch_size": batch_size, **dict(self.params)}


@dataclass(frozen=True)
class StageSpec:
    """What the stage builders get beside the EvalConfig (tests shrink these)."""

    eps_grid: tuple[float, ...]
    square_queries: int
    autoattack_steps: int = 100


def on_subset(
    cfg: EvalConfig, name: str, steps: int, *, seed_stream: str | None = None, **kw: Any
) -> list[Stage]:
    """An ART stage `name` (its attack, its seed stream unless given) on the AutoAttack subset,
    on the survivors of the PGD chain there (`after_all`); none when the subset is empty."""
    if cfg.autoattack_size <= 0:
        return []
    return [
        Stage(
            name,
            name,
            float(cfg.eps),
            steps=steps,
            subset="autoattack",
            engine="art",
            seed_stream=seed_stream or name,
            after_all=cfg.early_exit,  # the old cost: every clean-correct image of the subset
            **kw,
        )
    ]


def pgd_stage(name: str, eps: float, steps: int, engine: str, seed_stream: str, **kw: Any) -> Stage:
    """A PGD stage: step 2.5 eps / steps, one random start per restart, on either engine."""
    params = (("step_size", pgd_step_size(eps, steps)), ("restarts", 1)) if engine == "art" else ()
    return Stage(
        name, "pgd", float(eps), steps, engine=engine, seed_stream=seed_stream, params=params, **kw
    )
