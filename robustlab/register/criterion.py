"""The validation criterion that picks the model to register (never test data).

Among feasible candidates (selection clean accuracy >= the clean floor), the highest
min(sel/pgd_acc, sel/inv_bal_acc); ties broken by sel/clean_acc. The minimum rewards the model
that is robust to *both* kinds of adversarial example rather than excellent at one of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from robustlab.errors import RobustlabError

RULE = (
    "feasible: sel/clean_acc >= clean_floor; best: max min(sel/pgd_acc, sel/inv_bal_acc), "
    "ties by sel/clean_acc"
)
SEL_METRICS = ("sel/clean_acc", "sel/pgd_acc", "sel/inv_acc", "sel/inv_bal_acc")


@dataclass(frozen=True)
class Candidate:
    """A trained model and its selection (validation-only) metrics."""

    run_id: str
    model_uri: str
    metrics: dict[str, float]  # at least sel/clean_acc, sel/pgd_acc, sel/inv_bal_acc
    study: str = ""
    trial: str = ""
    params: dict[str, str] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return min(self.metrics["sel/pgd_acc"], self.metrics["sel/inv_bal_acc"])

    @property
    def key(self) -> tuple[float, float]:
        """Larger is better: (criterion, tie-breaker)."""
        return (self.score, self.metrics["sel/clean_acc"])

    def feasible(self, clean_floor: float) -> bool:
        return self.metrics["sel/clean_acc"] >= clean_floor


def choose(candidates: Iterable[Candidate], clean_floor: float, source: str) -> Candidate:
    """The best feasible candidate; one-line RobustlabError when there is none."""
    found = list(candidates)
    if not found:
        raise RobustlabError(
            f"{source} has no finished model to choose from; finish at least one trial or run first"
        )
    feasible = [c for c in found if c.feasible(clean_floor)]
    if not feasible:
        best_clean = max(c.metrics["sel/clean_acc"] for c in found)
        raise RobustlabError(
            f"none of the {len(found)} models of {source} reaches the clean floor {clean_floor:g} "
            f"(best sel/clean_acc {best_clean:.4f}); lower clean_floor or train better models"
        )
    return max(feasible, key=lambda c: c.key)
