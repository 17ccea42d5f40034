"""PGD (L-inf, random start): the attack, and its three evaluation uses: PGD-40 on every image,
R restarts of PGD-S on its survivors, and the accuracy-vs-eps curve."""

from __future__ import annotations

from typing import Any

import numpy as np

from robustlab.attacks.attack import (
    Attack,
    StageEntry,
    check_batch_size,
    check_step_size,
    check_steps,
    restarts_at_least,
)
from robustlab.attacks.stage import Stage, StageSpec, pgd_stage, stream_seed
from robustlab.config import EvalConfig, pgd_step_size


def build_pgd(
    classifier, *, eps: float, max_iter: int, eps_step: float, num_random_init: int, batch_size: int
) -> Any:
    from art.attacks.evasion import ProjectedGradientDescent

    return ProjectedGradientDescent(
        classifier,
        norm=np.inf,
        eps=eps,
        eps_step=float(eps_step),
        max_iter=int(max_iter),
        num_random_init=int(num_random_init),
        batch_size=int(batch_size),
        verbose=False,
    )


def library(cfg: EvalConfig) -> str:
    return (
        "ART ProjectedGradientDescent"
        if cfg.pgd_engine == "art"
        else "robustlab.attacks.tf_attacks.pgd_attack (matches ART's PGD, tested; early exit)"
    )


def restart_stage_name(steps: int, restarts: int) -> str:
    return f"pgd{steps}x{restarts}"


def _pgd40(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    return [pgd_stage("pgd40", cfg.eps, 40, cfg.pgd_engine, "pgd40")]


def _restarts(cfg: EvalConfig, spec: StageSpec) -> list[Stage]:
    if cfg.pgd_restarts <= 0:
        return []
    name = restart_stage_name(cfg.pgd_steps, cfg.pgd_restarts)
    return [
        pgd_stage(name, cfg.eps, cfg.pgd_steps, cfg.pgd_engine, "pgd100", restarts=cfg.pgd_restarts)
    ]


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


def _restart_seeds(cfg: EvalConfig) -> list[int]:
    return [stream_seed(cfg.seed, RESTARTS.stream_number, r) for r in range(cfg.pgd_restarts)]


PGD40 = StageEntry(
    name="pgd40",
    stream_id=1,
    stages=_pgd40,
    metric=lambda cfg: "test/pgd40_acc",
    label=lambda cfg: "PGD-40",
    card=lambda metric: "PGD-40",
    describe=lambda cfg, spec, n: {
        "library": library(cfg),
        "steps": 40,
        "step_size": pgd_step_size(cfg.eps, 40),
        "random_starts": 1,
    },
)
RESTARTS = StageEntry(
    name="pgd_restarts",
    seed_stream="pgd100",
    stream_id=2,
    stages=_restarts,
    metric=lambda cfg: (
        f"test/{restart_stage_name(cfg.pgd_steps, cfg.pgd_restarts)}_acc"
        if cfg.pgd_restarts > 0
        else None
    ),
    metric_pattern=r"test/pgd\d+x\d+_acc",
    label=lambda cfg: f"PGD-{cfg.pgd_steps}x{cfg.pgd_restarts}",
    card=lambda metric: f"PGD-{metric[8:-4]} (restarts, worst case with PGD-40)",
    describe=lambda cfg, spec, n: {
        "library": library(cfg),
        "steps": cfg.pgd_steps,
        "step_size": pgd_step_size(cfg.eps, cfg.pgd_steps),
        "restarts": cfg.pgd_restarts,
        "start_seeds": _restart_seeds(cfg),
        "note": "worst case with PGD-40; each restart attacks the survivors from a new start",
    },
)
CURVE = StageEntry(
    name="curve",
    stream_id=3,
    stages=_curve,
    metric=lambda cfg: None,
    label=lambda cfg: "PGD-40 accuracy-vs-eps curve",
    describe=lambda cfg, spec, n: {"library": library(cfg), "steps": 40},
    last=True,
)

ATTACK = Attack(
    name="pgd",
    label="PGD",
    paper="Madry et al. 2018, Towards Deep Learning Models Resistant to Adversarial Attacks (ICLR)",
    defaults={"max_iter": 40, "eps_step": 0.01, "num_random_init": 1, "batch_size": 500},
    build=build_pgd,
    position=20,
    checks=(check_steps, check_step_size, check_batch_size, restarts_at_least(0)),
    stages=(PGD40, RESTARTS, CURVE),
)
