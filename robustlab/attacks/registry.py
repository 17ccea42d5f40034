"""Attacks by name, and the evaluation stages they run as: the one place an attack is added.

An `AttackEntry` declares an attack's parameters (ART's spelling, robustlab's aliases, defaults
and checks) and builds it on an ART classifier of the model's logits (`make_attack`). A
`StageEntry` declares how the evaluation runs an attack: its seed stream, the subset it attacks
and whether it attacks the survivors of the stages before it (`build_stages`), which metric it
produces and the line that describes it in evaluation.json / evaluation.md. Stages marked
`optional` run only when named in `EvalConfig.extra_attacks` (`robustlab evaluate
--extra-attacks NAME`).

To add an attack: one `AttackEntry` (and its builder) and, to evaluate with it, one
`StageEntry`, here; then its test in tests/test_attack_registry.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robustlab.attacks.art_factory import (
    build_apgd,
    build_autoattack,
    build_fgsm,
    build_pgd,
    build_square,
)
from robustlab.config import PGD_ENGINES, AttackConfig, EvalConfig, pgd_step_size
from robustlab.errors import ConfigError

ALIASES = {"steps": "max_iter", "step_size": "eps_step", "restarts": "num_random_init"}


def _eps_step(eps: float) -> float:
    return 2.0 * eps if eps > 0 else 0.01


@dataclass(frozen=True)
class AttackEntry:
    """An L-inf evasion attack on an ART classifier: parameters (ART names) and a builder."""

    name: str
    label: str  # as a report names it
    defaults: dict[str, Any]  # ART name -> default value, or a function of eps
    build: Callable[..., Any]  # (classifier, eps, **params) -> object with .generate(x, y)
    min_restarts: int = 1

    def params(self, eps: float, given: dict[str, Any]) -> dict[str, Any]:
        """`given` (robustlab or ART spelling) over the defaults, checked; ConfigError (one line)."""
        out: dict[str, Any] = {}
        for key, value in given.items():
            art_key = ALIASES.get(key, key)
            if art_key in out:
                raise ConfigError(
                    f"attack {self.name!r}: parameter {key!r} given twice (also as {art_key!r})"
                )
            out[art_key] = value
        unknown = sorted(set(out) - set(self.defaults))
        if unknown:
            raise ConfigError(
                f"attack {self.name!r}: unknown parameter(s) {unknown}; allowed: "
                f"{sorted(self.defaults)}"
            )
        for key, default in self.defaults.items():
            if key not in out:
                out[key] = default(eps) if callable(default) else default
        # one-line errors for the ranges shared by all attacks
        AttackConfig(
            eps=float(eps), steps=int(out["max_iter"]), step_size=float(out["eps_step"])
        ).validate()
        if int(out["batch_size"]) < 1:
            raise ConfigError(
                f"attack {self.name!r}: batch_size must be >= 1, got {out['batch_size']}"
            )
        if int(out["num_random_init"]) < self.min_restarts:
            raise ConfigError(
                f"attack {self.name!r}: restarts must be >= {self.min_restarts}, got "
                f"{out['num_random_init']}"
            )
        return out


_COMMON = {"max_iter": 100, "eps_step": _eps_step, "num_random_init": 1, "batch_size": 500}


class TargetedAPGD:
    """APGD-T (Croce & Hein 2020): ART's targeted APGD with the DLR loss against each of the
    `targets` classes the clean logits rank highest after the true one, each run on the examples
    the earlier targets left standing; an example counts as broken once it is misclassified."""

    def __init__(self, classifier, *, eps: float, targets: int, **apgd: Any) -> None:
        if not 1 <= int(targets) <= 9:
            raise ConfigError(f"attack 'apgd_t': targets must lie in 1..9, got {targets}")
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


ATTACKS: dict[str, AttackEntry] = {
    e.name: e
    for e in (
        AttackEntry("fgsm", "FGSM", {**_COMMON, "num_random_init": 0}, build_fgsm, min_restarts=0),
        AttackEntry("pgd", "PGD", {**_COMMON, "max_iter": 40, "eps_step": 0.01}, build_pgd, 0),
        AttackEntry("apgd", "APGD", {**_COMMON, "loss_type": "cross_entropy"}, build_apgd),
        AttackEntry(
            "autoattack",
            "AutoAttack",
            {**_COMMON, "square_queries": 5000, "version": "standard"},
            build_autoattack,
        ),
        AttackEntry("square", "Square", {**_COMMON, "max_iter": 5000, "p_init": 0.8}, build_square),
        AttackEntry("apgd_t", "APGD-T", {**_COMMON, "targets": 9}, TargetedAPGD),
    )
}
ATTACK_NAMES = tuple(ATTACKS)


def make_attack(name: str, classifier, *, eps: float, **params: Any):
    """An ART L-inf evasion attack by registry name (see ATTACKS), parameters in robustlab or ART
    spelling: `steps`/`max_iter`, `step_size`/`eps_step`, `restarts`/`num_random_init` (random
    starts; for PGD/APGD the worst case is kept), `batch_size` (default 500). Defaults: pgd 40
    steps of 0.01, one random start; apgd 100 steps, initial step 2*eps, `loss_type`
    "cross_entropy" (or "difference_logits_ratio"); square 5000 queries; autoattack
    `version="standard"`: ART `AutoAttack` over APGD-CE, APGD-DLR (100 steps each) and Square
    (`square_queries`), each on the examples still robust (`version="art"`: ART's own list).
    Bad values raise a one-line ConfigError."""
    key = str(name).lower()
    if key not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; choose one of {', '.join(ATTACK_NAMES)}")
    entry = ATTACKS[key]
    return entry.build(classifier, eps=float(eps), **entry.params(float(eps), params))


# ---- evaluation stages ------------------------------------------------------------------------

SUBSETS = ("all", "autoattack", "curve")
ENGINES = PGD_ENGINES


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
        if self.attack not in ATTACKS:
            raise ConfigError(f"stage {self.name}: attack must be one of {ATTACK_NAMES}")
        if self.subset not in SUBSETS:
            raise ConfigError(f"stage {self.name}: subset must be one of {SUBSETS}")
        if self.engine not in ENGINES or (self.attack != "pgd" and self.engine != "art"):
            raise ConfigError(
                f"stage {self.name}: engine must be one of {ENGINES} (ART if not PGD)"
            )
        if self.steps < 1 or self.restarts < 1:
            raise ConfigError(f"stage {self.name}: steps and restarts must be >= 1")
        if self.seed_stream not in SEED_STREAMS:
            raise ConfigError(f"stage {self.name}: unknown seed stream {self.seed_stream!r}")
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


@dataclass(frozen=True)
class StageEntry:
    """How the evaluation runs an attack (see the module docstring)."""

    name: str
    attack: str
    seed_stream: str
    stream_id: int  # never reused: an attack's random starts must not depend on another's
    stages: Callable[[EvalConfig, StageSpec], list[Stage]]
    metric: Callable[[EvalConfig], str | None]  # its accuracy metric (None: per-point, curve)
    label: Callable[[EvalConfig], str]
    describe: Callable[[EvalConfig, StageSpec, int], dict[str, Any]]  # evaluation.json entry
    optional: bool = False
    extra_metrics: tuple[str, ...] = field(default=())


def _pgd_library(cfg: EvalConfig) -> str:
    return (
        "ART ProjectedGradientDescent"
        if cfg.pgd_engine == "art"
        else "robustlab.attacks.tf_attacks.pgd_attack (matches ART's PGD, tested; early exit)"
    )


def restart_stage_name(steps: int, restarts: int) -> str:
    return f"pgd{steps}x{restarts}"


def pgd_stage(name: str, eps: float, steps: int, engine: str, seed_stream: str, **kw: Any) -> Stage:
    """A PGD stage: step 2.5 eps / steps, one random start per restart, on either engine."""
    params = (("step_size", pgd_step_size(eps, steps)), ("restarts", 1)) if engine == "art" else ()
    return Stage(
        name, "pgd", float(eps), steps, engine=engine, seed_stream=seed_stream, params=params, **kw
    )


def _pgd40(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    return [pgd_stage("pgd40", cfg.eps, 40, cfg.pgd_engine, "pgd40")]


def _restarts(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    if cfg.pgd_restarts <= 0:
        return []
    name = restart_stage_name(cfg.pgd_steps, cfg.pgd_restarts)
    return [
        pgd_stage(name, cfg.eps, cfg.pgd_steps, cfg.pgd_engine, "pgd100", restarts=cfg.pgd_restarts)
    ]


def on_subset(cfg: EvalConfig, name: str, steps: int, **kw: Any) -> list[Stage]:
    """An ART stage `name` (its attack, its own seed stream) on the AutoAttack subset, on the
    survivors of the PGD chain there (`after_all`); none when the subset is empty."""
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
            seed_stream=name,
            after_all=cfg.early_exit,  # the old cost: every clean-correct image of the subset
            **kw,
        )
    ]


def _autoattack(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    params = (("square_queries", spec.square_queries),)
    return on_subset(cfg, "autoattack", spec.autoattack_steps, params=params)


def _square(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    if not cfg.square_alone:
        return []
    params = (("restarts", 1),)
    return on_subset(cfg, "square", spec.square_queries, params=params, independent=True)


def _apgd_t(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    # beside AutoAttack: the worst case over PGD and APGD-T alone
    return on_subset(cfg, "apgd_t", spec.autoattack_steps, independent=True)


def _curve(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    return [
        pgd_stage(
            f"curve@{float(e):g}",
            e,
            40,
            cfg.pgd_engine,
            "curve",
            subset="curve",
            seed_index=i,
            independent=not cfg.early_exit,  # the old cost: every point attacks every image
        )
        for i, e in enumerate(spec.eps_grid)
    ]


STAGES: dict[str, StageEntry] = {
    e.name: e
    for e in (
        StageEntry(
            "pgd40",
            "pgd",
            "pgd40",
            1,
            _pgd40,
            metric=lambda cfg: "test/pgd40_acc",
            label=lambda cfg: "PGD-40",
            describe=lambda cfg, spec, n: {
                "library": _pgd_library(cfg),
                "steps": 40,
                "step_size": pgd_step_size(cfg.eps, 40),
                "random_starts": 1,
            },
        ),
        StageEntry(
            "pgd_restarts",
            "pgd",
            "pgd100",
            2,
            _restarts,
            metric=lambda cfg: (
                f"test/{restart_stage_name(cfg.pgd_steps, cfg.pgd_restarts)}_acc"
                if cfg.pgd_restarts > 0
                else None
            ),
            label=lambda cfg: f"PGD-{cfg.pgd_steps}x{cfg.pgd_restarts}",
            describe=lambda cfg, spec, n: {
                "library": _pgd_library(cfg),
                "steps": cfg.pgd_steps,
                "step_size": pgd_step_size(cfg.eps, cfg.pgd_steps),
                "restarts": cfg.pgd_restarts,
                "start_seeds": [
                    attack_seed(cfg.seed, "pgd100", r) for r in range(cfg.pgd_restarts)
                ],
                "note": "worst case with PGD-40; each restart attacks the survivors from a new start",
            },
        ),
        StageEntry(
            "autoattack",
            "autoattack",
            "autoattack",
            4,
            _autoattack,
            metric=lambda cfg: "test/autoattack_acc",
            label=lambda cfg: "AutoAttack",
            describe=lambda cfg, spec, n: {
                "library": "ART AutoAttack",
                "attacks": ["APGD-CE", "APGD-DLR", "Square"],
                "apgd_steps": spec.autoattack_steps,
                "square_queries": spec.square_queries,
                "size": n,
            },
            extra_metrics=("test/pgd_subset_acc",),
        ),
        StageEntry(
            "square",
            "square",
            "square",
            5,
            _square,
            metric=lambda cfg: "test/square_acc",
            label=lambda cfg: "Square",
            describe=lambda cfg, spec, n: {
                "library": "ART SquareAttack",
                "queries": spec.square_queries,
                "size": n,
            },
        ),
        StageEntry(
            "apgd_t",
            "apgd_t",
            "apgd_t",
            6,
            _apgd_t,
            metric=lambda cfg: "test/apgd_t_acc",
            label=lambda cfg: "APGD-T",
            describe=lambda cfg, spec, n: {
                "library": "ART AutoProjectedGradientDescent (targeted, DLR loss)",
                "targets": 9,
                "apgd_steps": spec.autoattack_steps,
                "size": n,
            },
            optional=True,
        ),
        StageEntry(
            "curve",
            "pgd",
            "curve",
            3,
            _curve,
            metric=lambda cfg: None,
            label=lambda cfg: "PGD-40 accuracy-vs-eps curve",
            describe=lambda cfg, spec, n: {"library": _pgd_library(cfg), "steps": 40},
        ),
    )
}
SEED_STREAMS = {e.seed_stream: e.stream_id for e in STAGES.values()}
OPTIONAL_STAGES = tuple(name for name, e in STAGES.items() if e.optional)


def attack_seed(seed: int, stream: str, index: int = 0) -> int:
    """A reproducible seed of its own for each attack stage and restart (or eps-curve point).

    Every restart draws its random start from its own seed, so R restarts are R independent
    starts (not one start R times), and a restart does not depend on what ran before it.
    """
    words = [int(seed) % 2**32, SEED_STREAMS[stream], int(index)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def stage_seeds(stage: Stage, seed: int) -> list[int]:
    return [
        attack_seed(seed, stage.seed_stream, stage.seed_index + r) for r in range(stage.restarts)
    ]


def check_extra_attacks(names: Sequence[str]) -> tuple[str, ...]:
    """Optional stage names, checked against the registry (one-line ConfigError)."""
    unknown = [n for n in names if n not in OPTIONAL_STAGES]
    if unknown:
        raise ConfigError(
            f"unknown extra attack(s) {unknown}; choose from {list(OPTIONAL_STAGES) or 'none'}"
        )
    return tuple(dict.fromkeys(names))


def check_eval_config(cfg: EvalConfig) -> EvalConfig:
    """The attack-related parts of `cfg` the registry decides (one-line ConfigError)."""
    check_extra_attacks(cfg.extra_attacks)
    return cfg


def build_stages(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    """The evaluation's stages, in registry order: every non-optional entry, and the optional
    ones `cfg.extra_attacks` names (the curve last)."""
    out: list[Stage] = []
    for name, entry in STAGES.items():
        if entry.optional and name not in cfg.extra_attacks:
            continue
        if name != "curve":
            out.extend(entry.stages(cfg, spec))
    return out + STAGES["curve"].stages(cfg, spec)


def stage_entry(stage: Stage) -> StageEntry:
    """The registry entry a built stage comes from (by its seed stream)."""
    return next(e for e in STAGES.values() if e.seed_stream == stage.seed_stream)
