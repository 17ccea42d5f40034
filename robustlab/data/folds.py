"""Every human-labelled invariance example in one pool, and source-grouped cross-validation folds.

The pool holds the thesis ε=0.3 set (human labels from the ten raters' votes under the tie policy
`drop`: 493 of 500 examples) and Tramèr et al.'s L∞ 0.3, L∞ 0.4 and L0 sets (published labels),
each example with its set, position in that set, MNIST test source, original, target and human
label and its number of votes. A *group* is an MNIST test source: the examples made from one
source image (up to four: a Tramèr source carries one example per Tramèr set, and four sources
are also thesis sources) always fall in the same fold, so a model never trains or selects on an
example whose source image it is then judged on.

`assign_folds` splits the sources into K folds with scikit-learn's `StratifiedGroupKFold`
(shuffled, seeded; stratified so that label-changed examples spread evenly). For fold f a regime
trains on the other folds' examples, carves its validation pool from them by source, and predicts
fold f (`fold_pools`); every example is predicted exactly once per (regime, seed).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from robustlab.data.invariance import InvarianceSet, load_invariance_set
from robustlab.data.pools import InvPools, labels_for
from robustlab.errors import ConfigError

HUMAN_SETS = ("thesis_linf_eps0.3", "tramer_linf_eps0.3", "tramer_linf_eps0.4", "tramer_l0")
TIE_POLICY = "drop"
# Label-changed examples every fold model must train on, after its validation carve. The pool
# holds 139; with K=5 a fold's training folds hold 111-112, and carving VAL_FRACTION of their
# sources for early stopping (selection uses validation data only) leaves 89-98 to train on. The
# guard refuses a K that would leave fewer (K=3: 75); it does not bear on the verdicts'
# power, which rests on the 139 held-out examples every regime predicts.
MIN_TRAIN_CHANGED = 85
DEFAULT_FOLDS = 5
FOLD_SEED = 0
VAL_FRACTION = 0.15  # of a fold's training sources, carved out for validation (early stopping)


def check_sets(names: tuple[str, ...]) -> tuple[str, ...]:
    """Set names of the pool; ConfigError (one line) for an unknown or an unlabelled one."""
    unknown = [n for n in names if n not in HUMAN_SETS]
    if unknown or not names:
        raise ConfigError(
            f"unknown invariance set(s) {unknown or list(names)} in the pool; choose from "
            f"{list(HUMAN_SETS)} (the human-labelled sets)"
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class HumanPool:
    """Every human-labelled example of the chosen sets (see the module docstring)."""

    sets: dict[str, InvarianceSet]

    @cached_property
    def n(self) -> int:
        return sum(len(s) for s in self.sets.values())

    @cached_property
    def source(self) -> np.ndarray:
        """Each example's MNIST test source, in pool order (sets in order, then positions)."""
        return np.concatenate([s.source_index for s in self.sets.values()]).astype(np.int64)

    @cached_property
    def changed(self) -> np.ndarray:
        return np.concatenate([s.label_changed for s in self.sets.values()])

    @property
    def sources(self) -> np.ndarray:
        return np.unique(self.source)

    def rows(self) -> list[dict[str, object]]:
        """One row per example: set, index in the set, source, labels side by side, votes."""
        out = []
        for name, s in self.sets.items():
            votes = (s.votes >= 0).sum(axis=1) if s.votes is not None else np.zeros(len(s), int)
            for i in range(len(s)):
                out.append(
                    {
                        "set": name,
                        "index": int(s.ids[i]),
                        "source_split": s.source_split,
                        "source_index": int(s.source_index[i]),
                        "original_label": int(s.original_label[i]),
                        "target_label": int(s.target_label[i]),
                        "human_label": int(s.human_label[i]),
                        "label_changed": int(bool(s.label_changed[i])),
                        "n_votes": int(votes[i]),
                        "label_from": "votes" if s.votes is not None else "published",
                    }
                )
        return out


def load_human_pool(
    data_dir: str | os.PathLike | None = None, sets: tuple[str, ...] = HUMAN_SETS
) -> HumanPool:
    """The pool of `sets` (thesis labels from the votes under TIE_POLICY; ties are dropped)."""
    out = {}
    for name in check_sets(sets):
        s = load_invariance_set(name, data_dir)
        if s.votes is not None:
            s = load_invariance_set(name, data_dir, tie_policy=TIE_POLICY)
        s = s.take(np.flatnonzero(s.human_label >= 0))
        if s.source_split != "test":
            raise ConfigError(f"{name}: the pool takes sets made from MNIST test images only")
        out[name] = s
    return HumanPool(out)


@dataclass(frozen=True)
class FoldAssignment:
    """Which fold each MNIST source (and so each example) of a pool belongs to, and the
    validation sources each fold's models carve from their training folds."""

    k: int
    seed: int
    fold_of_example: np.ndarray  # int, pool order
    source: np.ndarray  # each example's source, pool order
    changed: np.ndarray  # each example's label-changed flag, pool order
    val_fraction: float = VAL_FRACTION

    def val_sources(self, fold: int) -> np.ndarray:
        """The sources carved out of fold `fold`'s training folds for validation (early
        stopping): `val_fraction` of them, stratified by whether a source has a label-changed
        example, seeded by the fold seed and `fold`."""
        rng = np.random.default_rng([self.seed, fold])
        training = self.fold_of_example != fold
        sources = np.unique(self.source[training])
        has_changed = np.isin(sources, self.source[training & self.changed])
        out = []
        for group in (sources[has_changed], sources[~has_changed]):
            n = max(1, round(self.val_fraction * len(group))) if len(group) else 0
            out.append(rng.choice(group, size=n, replace=False))
        return np.sort(np.concatenate(out))

    def roles(self, fold: int) -> np.ndarray:
        """Each example's role for fold `fold`'s models: "held" (predicted), "val", "train"."""
        role = np.where(np.isin(self.source, self.val_sources(fold)), "val", "train")
        return np.where(self.fold_of_example == fold, "held", role)

    def counts(self, mask: np.ndarray | None = None) -> list[dict[str, int]]:
        """Per fold: examples and label-changed examples the fold's models train on (after the
        validation carve), validate on and predict (held out), and held-out sources; `mask`
        restricts the training and validation counts to some examples (a regime that trains on
        one set only)."""
        mask = np.ones(len(self.source), bool) if mask is None else mask
        out = []
        for f in range(self.k):
            role = self.roles(f)
            row: dict[str, int] = {"fold": f}
            for name in ("train", "val", "held"):
                sel = role == name if name == "held" else (role == name) & mask
                row[f"{name}_examples"] = int(sel.sum())
                row[f"{name}_changed"] = int((sel & self.changed).sum())
            row["held_sources"] = len(np.unique(self.source[role == "held"]))
            out.append(row)
        return out

    @property
    def digest(self) -> str:
        data = np.stack([self.source, self.fold_of_example]).astype(np.int64).tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    def describe(self, mask: np.ndarray | None = None, what: str = "") -> str:
        """One line per fold, as printed before anything trains."""
        return "\n".join(
            f"fold {c['fold']}{what}: trains on {c['train_examples']} examples "
            f"({c['train_changed']} label-changed), validates on {c['val_examples']} "
            f"({c['val_changed']}), predicts {c['held_examples']} ({c['held_changed']}) from "
            f"{c['held_sources']} held-out sources"
            for c in self.counts(mask)
        )


def check_fold_count(k: int, n_sources: int) -> None:
    if k < 2:
        raise ConfigError(f"inv_folds must be >= 2 (cross-validation needs two folds), got {k}")
    if k > n_sources:
        raise ConfigError(
            f"inv_folds={k} is more than the pool's {n_sources} MNIST sources (a fold holds whole "
            "sources); lower inv_folds"
        )


def assign_folds(
    pool: HumanPool,
    k: int = DEFAULT_FOLDS,
    seed: int = FOLD_SEED,
    *,
    allow_small_folds: bool = False,
    min_changed: int = MIN_TRAIN_CHANGED,
) -> FoldAssignment:
    """Stratified, source-grouped K-fold assignment (deterministic from `seed`). ConfigError
    (one line, with the per-fold counts' minimum) when a training fold would hold fewer than
    `min_changed` label-changed examples, unless `allow_small_folds`."""
    from sklearn.model_selection import StratifiedGroupKFold

    check_fold_count(k, len(pool.sources))
    fold = np.full(pool.n, -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(splitter.split(np.zeros(pool.n), pool.changed, pool.source)):
        fold[held] = f
    out = FoldAssignment(k, seed, fold, pool.source, pool.changed)
    low = min(c["train_changed"] for c in out.counts())
    if low < min_changed and not allow_small_folds:
        raise ConfigError(
            f"inv_folds={k} leaves a fold model {low} label-changed examples to train on after "
            f"its validation carve (fewer than {min_changed}); use inv_folds={DEFAULT_FOLDS}, or "
            "pass allow_small_folds=true to accept it"
        )
    return out


def fold_pools(
    pool: HumanPool,
    folds: FoldAssignment,
    fold: int,
    label_source: str,
    *,
    train_sets: tuple[str, ...] | None = None,
) -> tuple[InvPools, tuple[InvarianceSet, ...]]:
    """(training/validation pools, held-out sets) of `fold`: the other folds' examples, their
    validation part carved out by source (`FoldAssignment.val_sources`), and fold `fold`'s
    examples of every set to predict. `train_sets`: only these sets' examples train and
    validate (claim 1's matched regimes); with `label_source` "target" only examples that have
    a target label do (Tramèr's sets have none)."""
    train, val, held_out = [], [], []
    start = 0
    val_sources = folds.val_sources(fold)
    for name, s in pool.sets.items():
        f = folds.fold_of_example[start : start + len(s)]
        start += len(s)
        held_out.append(s.take(np.flatnonzero(f == fold)))
        if train_sets is not None and name not in train_sets:
            continue
        rest = s.take(np.flatnonzero(f != fold))
        if label_source != "human":
            rest = rest.take(np.flatnonzero(_has(rest, label_source)))
        if not len(rest):
            continue
        labels_for(rest, label_source)  # one line if a label is missing
        in_val = np.isin(rest.source_index, val_sources)
        train.append(rest.take(np.flatnonzero(~in_val)))
        val.append(rest.take(np.flatnonzero(in_val)))
    if not any(len(t) for t in train) or not any(len(v) for v in val):
        raise ConfigError(
            f"fold {fold}: no {label_source}-labelled examples to train or validate on"
        )
    return InvPools(train, val, label_source), tuple(held_out)


def set_mask(pool: HumanPool, sets: tuple[str, ...]) -> np.ndarray:
    """Pool-order flags of the examples of `sets`."""
    return np.concatenate([np.full(len(s), n in sets) for n, s in pool.sets.items()])


def _has(s: InvarianceSet, label_source: str) -> np.ndarray:
    labels = {"target": s.target_label, "original": s.original_label}[label_source]
    return labels >= 0
