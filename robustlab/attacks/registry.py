"""Attacks by name and the evaluation stages they run as, collected from
`robustlab.attacks.families` (one module, one `ATTACK`, per family): the registry decides
nothing of its own. `make_attack`, `build_stages`, the EvalConfig checks, evaluation.json / .md,
the gradient-masking check, the model card, `evaluate`'s summary line and the docs' attack list
(`markdown_list`) read it. Stages marked `optional` run only when named in
`EvalConfig.extra_attacks` (`robustlab evaluate --extra-attacks NAME`).

To add an attack: one module in `robustlab/attacks/families/` and its test (then regenerate the
docs' list: `python -m robustlab.attacks.registry --write-docs`).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from robustlab.attacks import families
from robustlab.attacks.attack import Attack, StageEntry
from robustlab.attacks.stage import Stage, StageSpec, stream_seed
from robustlab.config import EvalConfig
from robustlab.errors import ConfigError

__all__ = ["Stage", "StageSpec"]  # re-exported: the evaluation builds stages through here


def collect(attacks: Iterable[Attack]) -> dict[str, Attack]:
    """Attacks by name in position order; refuses a name, stage or seed stream used twice."""
    out: dict[str, Attack] = {}
    stages: set[str] = set()
    streams: dict[int, str] = {}
    for attack in sorted(attacks, key=lambda a: (a.position, a.name)):
        if attack.name in out:
            raise ConfigError(f"attack {attack.name!r} is registered twice")
        for entry in attack.stages:
            if entry.name in stages:
                raise ConfigError(f"stage {entry.name!r} is registered twice")
            owner = streams.setdefault(entry.stream_number, entry.stream)
            if owner != entry.stream:
                raise ConfigError(
                    f"seed streams {owner!r} and {entry.stream!r} share id {entry.stream_number}"
                )
            stages.add(entry.name)
        out[attack.name] = attack
    return out


def _discover() -> list[Attack]:
    modules = sorted(m.name for m in pkgutil.iter_modules(families.__path__))
    return [importlib.import_module(f"{families.__name__}.{m}").ATTACK for m in modules]


ATTACKS: dict[str, Attack] = collect(_discover())
ATTACK_NAMES = tuple(ATTACKS)
STAGES: dict[str, StageEntry] = {
    e.name: e
    for e in sorted(
        (e for a in ATTACKS.values() for e in a.stages), key=lambda e: e.last
    )  # stable: position order, the `last` ones (the eps curve) at the end
}
SEED_STREAMS = {e.stream: e.stream_number for e in STAGES.values()}
OPTIONAL_STAGES = tuple(name for name, e in STAGES.items() if e.optional)


def make_attack(name: str, classifier, *, eps: float, **params: Any):
    """An ART L-inf evasion attack by registry name (see ATTACKS and each family's module),
    parameters in robustlab or ART spelling: `steps`/`max_iter`, `step_size`/`eps_step`,
    `restarts`/`num_random_init`, `batch_size` (default 500) and the attack's own. Bad values
    raise a one-line ConfigError."""
    from robustlab.config import AttackConfig

    key = str(name).lower()
    if key not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; choose one of {', '.join(ATTACK_NAMES)}")
    AttackConfig(eps=float(eps)).validate()  # eps in [0, 1], finite
    attack = ATTACKS[key]
    return attack.build(classifier, eps=float(eps), **attack.params(float(eps), params))


# ---- evaluation stages ------------------------------------------------------------------------


def attack_seed(seed: int, stream: str, index: int = 0) -> int:
    """A reproducible seed of its own for each attack stage and restart (or eps-curve point)."""
    if stream not in SEED_STREAMS:
        raise ConfigError(f"unknown seed stream {stream!r}; choose one of {list(SEED_STREAMS)}")
    return stream_seed(seed, SEED_STREAMS[stream], index)


def stage_seeds(stage: Stage, seed: int) -> list[int]:
    return [
        attack_seed(seed, stage.seed_stream, stage.seed_index + r) for r in range(stage.restarts)
    ]


def check_stage(stage: Stage) -> Stage:
    """`stage`'s shape, attack and seed stream (one-line ConfigError)."""
    if stage.attack not in ATTACKS:
        raise ConfigError(f"stage {stage.name}: attack must be one of {ATTACK_NAMES}")
    if stage.seed_stream not in SEED_STREAMS:
        raise ConfigError(f"stage {stage.name}: unknown seed stream {stage.seed_stream!r}")
    return stage.validate()


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
    ones `cfg.extra_attacks` names (the eps curve last)."""
    out: list[Stage] = []
    for name, entry in STAGES.items():
        if not entry.optional or name in cfg.extra_attacks:
            out.extend(entry.stages(cfg, spec))
    return out


def stage_entry(stage: Stage) -> StageEntry:
    """The registry entry a built stage comes from (by its seed stream)."""
    return next(e for e in STAGES.values() if e.stream == stage.seed_stream)


def card_rows(metrics: Iterable[str]) -> list[tuple[str, str]]:
    """(metric, model-card label) for each of `metrics` a stage entry puts on the model card,
    in registry order (several names of one entry sorted)."""
    names = sorted(metrics)
    return [
        (m, e.card(m)) for e in STAGES.values() if e.card is not None for m in names if e.logs(m)
    ]


# ---- the docs' attack list ---------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"
BEGIN, END = "<!-- attack-list:begin (generated by markdown_list) -->", "<!-- attack-list:end -->"


def markdown_list() -> str:
    """The registry's attacks as a Markdown list (the docs' generated section between BEGIN and
    END): name, label, stages with their metric (under the default EvalConfig), label, whether
    optional and masking-checked, paper."""
    cfg = EvalConfig()
    lines = []
    for a in ATTACKS.values():
        uses = []
        for e in a.stages:
            metric = e.metric(cfg)
            what = f"`{metric}`" if metric else "a metric per point"
            flags = [e.label(cfg)] + [
                f for f, on in (("optional", e.optional), ("masking check", e.masking_check)) if on
            ]
            uses.append(f"stage `{e.name}` → {what} ({', '.join(flags)})")
        stages = "; ".join(uses) or "no evaluation stage (`make_attack` only)"
        lines.append(f"- `{a.name}` ({a.label}): {stages}. {a.paper}.")
    return "\n".join(lines) + "\n"


def documented_list(text: str) -> str | None:
    """The generated section of a Markdown document (None: it has none)."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_docs(path: Path = DOCS) -> None:
    """Replace the generated section of `path` with `markdown_list()`."""
    text = path.read_text()
    if documented_list(text) is None:
        raise ConfigError(f"{path}: no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{markdown_list()}{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-docs"]:
        write_docs()
    else:
        sys.stdout.write(markdown_list())
