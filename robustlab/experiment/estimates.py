"""Every figure of the experiment's report, computed from its two per-example tables by one
function, `compute_figures`, so that a reader can recompute any number from the logged tables.

- The invariance table (`inv_predictions` on the parent run) has one row per (human-labelled
  example, regime, seed): the example's set, its position in that set, its MNIST source, its
  original and human labels, whether humans changed the label, the fold that predicted it and
  the out-of-fold prediction, and `correct` (prediction == human label).
- The test table (`test_outcomes`) has one row per (test image, regime, seed): clean, PGD-40 and
  AutoAttack outcomes (AutoAttack only on the experiment's fixed subset); for a regime trained
  once per fold, each outcome is the share of its fold models that got the image right.

Accuracies are means over examples and seeds with 95% intervals that account for example
sampling (clustered by source) and seeds; effects are paired per example
(`robustlab.evaluation.intervals`); each part's planned MDE comes from the tables' sample sizes
alone (`robustlab.experiment.design`); verdicts follow `robustlab.experiment.verdicts`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from robustlab.errors import RobustlabError
from robustlab.evaluation.intervals import (
    Effect,
    Outcomes,
    accuracy_interval,
    effect,
    invariance_intervals,
)
from robustlab.experiment.design import Group, metric_mde
from robustlab.experiment.verdicts import MARGINS, ClaimVerdict, comparisons, judge_claims

ALL = "all"  # the per-set key of the whole pool
TEST_METRICS = ("clean", "pgd40", "autoattack")
Interval = tuple[float, float, float, int]  # mean, low, high, examples


@dataclass(frozen=True)
class InvMatrix:
    """One regime's out-of-fold correctness on every example: (examples, seeds)."""

    correct: np.ndarray
    source: np.ndarray
    changed: np.ndarray
    set_name: np.ndarray


@dataclass
class Figures:
    regimes: tuple[str, ...]
    seeds: tuple[int, ...]
    n_examples: int
    n_changed: int
    n_sources: int
    n_test: int
    inv: dict[str, dict[str, dict[str, Interval]]] = field(default_factory=dict)
    test: dict[str, dict[str, Interval]] = field(default_factory=dict)
    effects: dict[tuple[str, str, str], Effect] = field(default_factory=dict)
    planned: dict[tuple[str, str, str], float] = field(default_factory=dict)  # planned MDEs
    margins: dict[str, float] = field(default_factory=lambda: dict(MARGINS))
    claims: list[ClaimVerdict] = field(default_factory=list)


def _inv_matrices(rows: Iterable[dict], regimes: Sequence[str], seeds: Sequence[int]):
    """Per regime, the (examples, seeds) correctness matrix over one shared example order;
    RobustlabError unless every example is predicted exactly once per (regime, seed)."""
    rows = list(rows)
    keys = sorted({(str(r["set"]), int(r["index"])) for r in rows})
    pos = {k: i for i, k in enumerate(keys)}
    meta = {}
    out = {}
    for regime in regimes:
        m = np.full((len(keys), len(seeds)), -1, dtype=np.int8)
        for r in rows:
            if r["regime"] != regime:
                continue
            i, s = pos[(str(r["set"]), int(r["index"]))], seeds.index(int(r["seed"]))
            if m[i, s] >= 0:
                raise RobustlabError(f"{regime} seed {r['seed']} predicted {keys[i]} twice")
            m[i, s] = int(r["correct"])
            meta[i] = (int(r["source_index"]), bool(int(r["label_changed"])), str(r["set"]))
        missing = int((m < 0).sum())
        if missing:
            raise RobustlabError(f"{regime}: {missing} (example, seed) predictions are missing")
        out[regime] = m
    source = np.array([meta[i][0] for i in range(len(keys))], dtype=np.int64)
    changed = np.array([meta[i][1] for i in range(len(keys))], dtype=bool)
    set_name = np.array([meta[i][2] for i in range(len(keys))])
    return {k: InvMatrix(v, source, changed, set_name) for k, v in out.items()}


def _test_matrices(rows: Iterable[dict], regimes: Sequence[str], seeds: Sequence[int]):
    """Per regime and metric, (images, seeds) outcomes over one shared image order (NaN where
    an image was not attacked by that metric's attack)."""
    rows = list(rows)
    images = sorted({int(r["source_index"]) for r in rows})
    pos = {k: i for i, k in enumerate(images)}
    out = {}
    for regime in regimes:
        mats = {m: np.full((len(images), len(seeds)), np.nan) for m in TEST_METRICS}
        for r in rows:
            if r["regime"] != regime:
                continue
            i, s = pos[int(r["source_index"])], seeds.index(int(r["seed"]))
            for m in TEST_METRICS:
                if r.get(m, "") not in ("", None):
                    mats[m][i, s] = float(r[m])
        out[regime] = mats
    return np.array(images, dtype=np.int64), out


def _inv_groups(a: InvMatrix, b: InvMatrix, mask: np.ndarray) -> list[Outcomes]:
    changed, kept = mask & a.changed, mask & ~a.changed
    return [
        Outcomes(a.correct[g].astype(float), b.correct[g].astype(float), a.source[g])
        for g in (changed, kept)
    ]


def _inv_effect(metric: str, a: InvMatrix, b: InvMatrix, mask: np.ndarray) -> Effect:
    changed, kept = _inv_groups(a, b, mask)
    n_changed = changed.n_examples
    if metric == "changed":
        return effect(metric, [changed], n_changed=n_changed)
    if metric == "kept":
        return effect(metric, [kept], n_changed=0)
    return effect(metric, [changed, kept], [0.5, 0.5], n_changed=n_changed)


def _test_effect(metric: str, a: np.ndarray, b: np.ndarray, images: np.ndarray) -> Effect:
    rows = ~np.isnan(a).any(axis=1) & ~np.isnan(b).any(axis=1)
    return effect(metric, [Outcomes(a[rows], b[rows], images[rows])])


def _planned(metric: str, m: InvMatrix, n_pgd: int, seeds: int) -> float:
    """The planned MDE of a comparison on `metric` (sample sizes only, no outcome)."""

    def group(name: str, mask: np.ndarray) -> Group:
        return Group(name, int(mask.sum()), len(np.unique(m.source[mask])))

    changed, kept = group("changed", m.changed), group("kept", ~m.changed)
    return metric_mde(metric, changed, kept, n_pgd, seeds)


def _inv_accuracies(m: InvMatrix) -> dict[str, dict[str, Interval]]:
    out: dict[str, dict[str, Interval]] = {}
    for name in [ALL, *sorted(set(m.set_name))]:
        mask = np.ones(len(m.source), bool) if name == ALL else m.set_name == name
        out[name] = invariance_intervals(m.correct[mask], m.changed[mask], m.source[mask])
    return out


def compute_figures(
    inv_rows: Iterable[dict],
    test_rows: Iterable[dict],
    regimes: Sequence[str],
    seeds: Sequence[int],
    margins: dict[str, float] = MARGINS,
) -> Figures:
    """Every number of the report from the two tables (see the module docstring): per-regime
    invariance accuracies (label-changed, label-kept, balanced; the whole pool and per set),
    per-regime test accuracies (clean, PGD-40, AutoAttack), the paired effects every claim part
    needs and the claims' verdicts."""
    seeds = [int(s) for s in seeds]
    inv = _inv_matrices(inv_rows, regimes, seeds)
    images, test = _test_matrices(test_rows, regimes, seeds)
    first = inv[regimes[0]]
    fig = Figures(
        tuple(regimes),
        tuple(seeds),
        len(first.source),
        int(first.changed.sum()),
        len(np.unique(first.source)),
        len(images),
    )
    for regime in regimes:
        fig.inv[regime] = _inv_accuracies(inv[regime])
        fig.test[regime] = {}
        for metric, values in test[regime].items():
            rows = ~np.isnan(values).any(axis=1)
            if rows.any():
                mean, low, high = accuracy_interval(values[rows], images[rows])
                fig.test[regime][metric] = (mean, low, high, int(rows.sum()))
    fig.margins = dict(margins)
    everything = np.ones(fig.n_examples, bool)
    for a, b, metric in comparisons():
        if a not in inv or b not in inv:
            continue
        if metric == "pgd40":
            e = _test_effect(metric, test[a]["pgd40"], test[b]["pgd40"], images)
        else:
            e = _inv_effect(metric, inv[a], inv[b], everything)
        fig.effects[(a, b, metric)] = e
        n_pgd = e.n_examples if metric == "pgd40" else 0
        fig.planned[(a, b, metric)] = _planned(metric, first, n_pgd, len(seeds))
    fig.claims = judge_claims(fig.effects, fig.planned, fig.margins)
    return fig
