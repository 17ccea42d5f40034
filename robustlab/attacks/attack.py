"""What an attack family declares, in one object: `Attack` (name, label, paper, parameters and
their checks, builder, position) and its evaluation uses, `StageEntry` (stages, seed stream,
metric, report and model-card lines, whether the gradient-masking check applies).

Parameter checks are opt-in: an attack lists the shared ones it needs (`check_steps`,
`check_step_size`, `check_batch_size`, `restarts_at_least(n)`) beside its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from robustlab.attacks.stage import Stage, StageSpec, derived_stream_id
from robustlab.config import EvalConfig
from robustlab.errors import ConfigError

ALIASES = {"steps": "max_iter", "step_size": "eps_step", "restarts": "num_random_init"}

Params = dict[str, Any]
Check = Callable[[str, float, Params], None]  # (attack name, eps, params) -> None or ConfigError


def check_steps(name: str, eps: float, p: Params) -> None:
    if int(p["max_iter"]) < 1:
        raise ConfigError(f"attack {name!r}: steps must be >= 1, got {p['max_iter']}")


def check_step_size(name: str, eps: float, p: Params) -> None:
    step = float(p["eps_step"])
    if not (math.isfinite(step) and step > 0):
        raise ConfigError(f"attack {name!r}: step_size must be > 0, got {p['eps_step']}")


def check_batch_size(name: str, eps: float, p: Params) -> None:
    if int(p["batch_size"]) < 1:
        raise ConfigError(f"attack {name!r}: batch_size must be >= 1, got {p['batch_size']}")


def restarts_at_least(n: int) -> Check:
    def check_restarts(name: str, eps: float, p: Params) -> None:
        if int(p["num_random_init"]) < n:
            raise ConfigError(
                f"attack {name!r}: restarts must be >= {n}, got {p['num_random_init']}"
            )

    return check_restarts


def one_of(key: str, allowed: tuple[str, ...]) -> Check:
    def check_choice(name: str, eps: float, p: Params) -> None:
        if p[key] not in allowed:
            raise ConfigError(f"attack {name!r}: {key} must be one of {allowed}, got {p[key]!r}")

    return check_choice


def eps_step(eps: float) -> float:
    """APGD's initial step (and ART's AutoAttack's): 2 eps."""
    return 2.0 * eps if eps > 0 else 0.01


@dataclass(frozen=True, kw_only=True)
class StageEntry:
    """How the evaluation runs an attack.

    `stages` builds the stages for a config (none: skipped); `metric` names the accuracy they
    produce (None: per-point, the curve) and `metric_pattern` every name it can take (the model
    card finds its rows by it; default: the metric under the default EvalConfig). `card`: the
    model card's label for a metric name (None: no card row). `masking_check`: accuracy far
    below PGD's on the same examples is a gradient-masking warning. `seed_stream` (default: the
    entry's name) seeds its random starts with `stream_id` (default: derived from the stream's
    name; the attacks that existed before the derivation keep their ids, so seeds stay bitwise).
    `optional` stages run only when `EvalConfig.extra_attacks` names them; `last` runs after all
    others (the eps curve).
    """

    name: str
    stages: Callable[[EvalConfig, StageSpec], list[Stage]]
    metric: Callable[[EvalConfig], str | None]
    label: Callable[[EvalConfig], str]
    describe: Callable[[EvalConfig, StageSpec, int], dict[str, Any]]  # evaluation.json entry
    card: Callable[[str], str] | None = None
    metric_pattern: str | None = None
    masking_check: bool = False
    seed_stream: str | None = None
    stream_id: int | None = None
    optional: bool = False
    last: bool = False
    extra_metrics: tuple[str, ...] = field(default=())

    @property
    def stream(self) -> str:
        return self.seed_stream or self.name

    @property
    def stream_number(self) -> int:
        return derived_stream_id(self.stream) if self.stream_id is None else self.stream_id

    def logs(self, metric: str) -> bool:
        """Whether `metric` is a name this entry's metric takes."""
        pattern = self.metric_pattern
        if pattern is None:
            default = self.metric(EvalConfig())
            pattern = re.escape(default) if default else None
        return pattern is not None and re.fullmatch(pattern, metric) is not None


@dataclass(frozen=True, kw_only=True)
class Attack:
    """An L-inf evasion attack on an ART classifier of the model's logits.

    `defaults`: its parameters in ART's spelling (a value, or a function of eps); robustlab's
    aliases (`steps`, `step_size`, `restarts`) map onto them. `checks`: run on the resolved
    parameters (shared ones opt-in). `build(classifier, eps=, **params)` returns an object with
    `.generate(x, y)`. `stages`: its evaluation uses. `position`: where its stages run and its
    rows stand among the registry's (ascending). `paper`: the citation.
    """

    name: str
    label: str
    paper: str
    defaults: Mapping[str, Any]
    build: Callable[..., Any]
    position: int
    checks: tuple[Check, ...] = ()
    stages: tuple[StageEntry, ...] = ()

    def params(self, eps: float, given: Mapping[str, Any]) -> Params:
        """`given` (robustlab or ART spelling) over the defaults, checked (one-line ConfigError)."""
        out: Params = {}
        for key, value in given.items():
            art_key = ALIASES.get(key, key) if ALIASES.get(key) in self.defaults else key
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
        for check in self.checks:
            check(self.name, eps, out)
        return out
