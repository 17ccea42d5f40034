"""The thesis's claims as parts with margins, and the rule that turns effects into verdicts.

Each part compares two regimes on one metric: label-changed, label-kept or balanced accuracy on
the human-labelled examples (out-of-fold predictions), or PGD-40 accuracy on the shared test
images. An effect is A − B with a 95% hierarchical-bootstrap interval [L, U] and the minimum
detectable effect (MDE) at 80% power (`robustlab.evaluation.bootstrap`). A part claims that the
effect lies on one side of a threshold t:

| kind | claim | t |
|---|---|---|
| improves | A is better than B by at least the margin δ | +δ |
| keeps | A is no worse than B by more than δ | −δ |
| does not help | A does not improve balanced accuracy by δ while keeping PGD-40 within δ_PGD | composite |

Rule: a part is **inconclusive** when its MDE exceeds δ (the comparison cannot see an effect of
the margin's size) or its interval straddles t; otherwise **supported** when the interval lies
on the claimed side of t and **not supported** when it lies on the other side. "Does not help" is
supported when the gain part is not supported or the keep part is not supported, not supported
when both are supported, inconclusive otherwise. A claim is supported when every part is, not
supported when any part is not, inconclusive otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from robustlab.evaluation.bootstrap import Effect

MARGINS = {"changed": 0.10, "kept": 0.05, "balanced": 0.05, "pgd40": 0.05}
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
METRIC_NAMES = {
    "changed": "label-changed accuracy",
    "kept": "label-kept accuracy",
    "balanced": "balanced invariance accuracy",
    "pgd40": "PGD-40 accuracy",
}


@dataclass(frozen=True)
class Part:
    key: str
    kind: str  # "improves" | "keeps" | "no_help"
    a: str
    b: str
    metric: str  # "changed" | "kept" | "balanced" | "pgd40" (no_help: balanced and pgd40)

    @property
    def text(self) -> str:
        if self.kind == "improves":
            return f"{self.a} improves {METRIC_NAMES[self.metric]} over {self.b}"
        if self.kind == "keeps":
            return f"{self.a} keeps {METRIC_NAMES[self.metric]} within the margin of {self.b}"
        return (
            f"{self.a} does not help over {self.b} (no gain in balanced invariance accuracy "
            "while keeping PGD-40 accuracy)"
        )


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    parts: tuple[Part, ...]


CLAIMS = (
    Claim(
        "1",
        "(1) invariance labels must come from humans (training on the attack's target labels "
        "instead of human labels hurts)",
        (Part("1", "improves", "invariance", "invariance_target", "balanced"),),
    ),
    Claim(
        "2",
        "(2) retraining a PGD-trained model on invariance examples does not help",
        (Part("2", "no_help", "sequential_ptb_inv", "perturbation", "balanced"),),
    ),
    Claim(
        "3",
        "(3) only training a fresh model on both kinds simultaneously helps",
        (
            Part("3a", "improves", "joint", "perturbation", "changed"),
            Part("3b", "improves", "joint", "perturbation", "balanced"),
            Part("3c", "keeps", "joint", "perturbation", "pgd40"),
            Part("3d", "no_help", "sequential_ptb_inv", "perturbation", "balanced"),
            Part("3e", "no_help", "sequential_inv_ptb", "perturbation", "balanced"),
        ),
    ),
)


@dataclass(frozen=True)
class PartVerdict:
    part: Part
    verdict: str
    reason: str
    effects: tuple[Effect, ...] = field(default=())


@dataclass(frozen=True)
class ClaimVerdict:
    claim: Claim
    verdict: str
    parts: tuple[PartVerdict, ...]


def judge(effect: Effect, kind: str, margin: float) -> tuple[str, str]:
    """(verdict, reason) of one effect under the rule (kind "improves" or "keeps")."""
    t = margin if kind == "improves" else -margin
    low, high = effect.ci_low, effect.ci_high
    ci = f"{effect.estimate:+.3f} [{low:+.3f}, {high:+.3f}]"
    if not all(math.isfinite(v) for v in (low, high, effect.mde)):
        return INCONCLUSIVE, f"no interval ({effect.n_examples} examples)"
    if effect.mde > margin:
        return INCONCLUSIVE, (
            f"{ci}: the smallest effect this comparison can detect at 80% power, "
            f"{effect.mde:.3f}, exceeds the margin {margin:.2f}"
        )
    if low > t:
        return SUPPORTED, f"{ci} lies above {t:+.2f}"
    if high < t:
        return NOT_SUPPORTED, f"{ci} lies below {t:+.2f}"
    return INCONCLUSIVE, f"{ci} straddles {t:+.2f}"


def judge_part(
    part: Part, effects: dict[tuple[str, str, str], Effect], margins: dict[str, float] = MARGINS
) -> PartVerdict:
    """The part's verdict from `effects[(a, b, metric)]`; inconclusive when one is missing."""
    metrics = ("balanced", "pgd40") if part.kind == "no_help" else (part.metric,)
    found = [effects.get((part.a, part.b, m)) for m in metrics]
    if any(e is None for e in found):
        return PartVerdict(part, INCONCLUSIVE, f"{part.a} or {part.b} was not trained")
    if part.kind != "no_help":
        verdict, reason = judge(found[0], part.kind, margins[part.metric])
        return PartVerdict(part, verdict, reason, tuple(found))
    gain, gain_why = judge(found[0], "improves", margins["balanced"])
    keep, keep_why = judge(found[1], "keeps", margins["pgd40"])
    reason = f"gain in balanced accuracy {gain} ({gain_why}); keeps PGD-40 {keep} ({keep_why})"
    if NOT_SUPPORTED in (gain, keep):
        return PartVerdict(part, SUPPORTED, reason, tuple(found))
    if gain == keep == SUPPORTED:
        return PartVerdict(part, NOT_SUPPORTED, reason, tuple(found))
    return PartVerdict(part, INCONCLUSIVE, reason, tuple(found))


def combine(verdicts: list[str]) -> str:
    """A claim from its parts: every part supported, any part not supported, else inconclusive."""
    if verdicts and all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def judge_claims(
    effects: dict[tuple[str, str, str], Effect], margins: dict[str, float] = MARGINS
) -> list[ClaimVerdict]:
    out = []
    for claim in CLAIMS:
        parts = tuple(judge_part(p, effects, margins) for p in claim.parts)
        out.append(ClaimVerdict(claim, combine([p.verdict for p in parts]), parts))
    return out


def comparisons() -> list[tuple[str, str, str]]:
    """Every (a, b, metric) effect some part needs."""
    needed = []
    for claim in CLAIMS:
        for p in claim.parts:
            metrics = ("balanced", "pgd40") if p.kind == "no_help" else (p.metric,)
            needed += [(p.a, p.b, m) for m in metrics]
    return list(dict.fromkeys(needed))
