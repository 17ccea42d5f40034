"""Model selection on validation data only: the selection metrics and the one selection rule.

Selection metrics (`sel/*`), all on validation data (the MNIST test set is never used):
- `sel/clean_acc`: clean accuracy on the 5,000-image validation split;
- `sel/pgd_acc`: PGD-10 accuracy at the training eps on a fixed, seeded validation subset;
- `sel/inv_bal_acc`: balanced invariance accuracy (mean of label-changed and label-kept
  agreement with human labels) on the selection set (`robustlab.data.tramer_halves`), beside the
  plain `sel/inv_acc`.

The rule (tune's scalar objective, register's criterion and the README all use it):
    feasible  iff sel/clean_acc >= clean_floor
    score     =   min(sel/pgd_acc, sel/inv_bal_acc) - max(0, clean_floor - sel/clean_acc)
    best      =   the feasible model with the highest score, ties broken by sel/clean_acc.
The minimum rewards a model that resists *both* kinds of adversarial example rather than one
that excels at one of them (the thesis's question); the clean shortfall term only matters for
infeasible models, where it gives a tuner a direction back to the floor.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from robustlab.data.mnist import load_mnist, subsample
from robustlab.data.pools import InvPools, load_inv_pools
from robustlab.data.tramer_halves import selection_sets, selection_sources
from robustlab.errors import RobustlabError
from robustlab.evaluation.validation import (
    VAL_ATTACK_SIZE,
    balanced_inv_accuracy,
    clean_validation,
    pgd_validation,
)

SEL_METRICS = ("sel/clean_acc", "sel/pgd_acc", "sel/inv_acc", "sel/inv_bal_acc")
SCORE_METRIC = "sel/score"
RULE = (
    "feasible: sel/clean_acc >= clean_floor; score: min(sel/pgd_acc, sel/inv_bal_acc) - "
    "max(0, clean_floor - sel/clean_acc); best: highest score among feasible, ties by "
    "sel/clean_acc"
)


def selection_score(clean: float, pgd: float, inv_bal: float, clean_floor: float) -> float:
    """The rule's score (see the module docstring)."""
    return min(pgd, inv_bal) - max(0.0, clean_floor - clean)


class SelectionData:
    """The validation data selection is measured on, loaded once (per worker or command)."""

    def __init__(
        self,
        data_dir: str | os.PathLike | None,
        eps: float,
        *,
        pools: InvPools | None = None,
        val_attack_size: int = VAL_ATTACK_SIZE,
        train_size: int = 0,
    ) -> None:
        """`train_size` only picks the cached MNIST copy (the validation split is the same)."""
        mnist = load_mnist(data_dir, train_size=train_size)
        pools = pools if pools is not None else load_inv_pools(data_dir)
        self.sets = selection_sets(data_dir, pools)
        self.sources = tuple(int(i) for i in selection_sources(data_dir, pools))
        self._clean = clean_validation(mnist.val)
        small = subsample(mnist.val, val_attack_size, seed=0)
        self._pgd = pgd_validation(small.x, small.y, eps)

    def metrics(self, model, clean_floor: float) -> dict[str, float]:
        """Every `sel/*` metric of `model`, `sel/score` under `clean_floor` included."""
        m = {
            "sel/clean_acc": self._clean(model)["val/clean_acc"],
            "sel/pgd_acc": self._pgd(model)["val/pgd_acc"],
            **balanced_inv_accuracy(model, self.sets, "sel"),
        }
        m[SCORE_METRIC] = selection_score(
            m["sel/clean_acc"], m["sel/pgd_acc"], m["sel/inv_bal_acc"], clean_floor
        )
        return m


@dataclass(frozen=True)
class Candidate:
    """A trained model and its selection (validation-only) metrics."""

    run_id: str
    model_uri: str
    metrics: dict[str, float]  # at least sel/clean_acc, sel/pgd_acc, sel/inv_bal_acc
    study: str = ""
    trial: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def score(self, clean_floor: float) -> float:
        m = self.metrics
        return selection_score(
            m["sel/clean_acc"], m["sel/pgd_acc"], m["sel/inv_bal_acc"], clean_floor
        )

    def key(self, clean_floor: float) -> tuple[float, float]:
        """Larger is better: (score, tie-breaker)."""
        return (self.score(clean_floor), self.metrics["sel/clean_acc"])

    def feasible(self, clean_floor: float) -> bool:
        return self.metrics["sel/clean_acc"] >= clean_floor


def choose(candidates: Iterable[Candidate], clean_floor: float, source: str) -> Candidate:
    """The best feasible candidate under the rule; one-line RobustlabError when there is none."""
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
    return max(feasible, key=lambda c: c.key(clean_floor))
