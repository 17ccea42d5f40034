"""Labelled pools: MNIST/invariance images in memory, the invariance training/validation pool and
the evaluation sets.

Training and validation use the thesis eps 0.3 human-labelled set, split by source image;
evaluation uses Tramèr's sets. Which label a training example carries is explicit
(`human`, `target` or `original`), so the thesis's target-label run can be re-done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from robustlab.data.invariance import InvarianceSet, load_invariance_set
from robustlab.data.labels import LabelStore
from robustlab.data.validate import check_images, check_labels
from robustlab.errors import ConfigError

LABEL_SOURCES = ("human", "target", "original")
TRAIN_POOL_SETS = ("thesis_linf_eps0.3",)
EVAL_SETS = ("tramer_linf_eps0.3", "tramer_linf_eps0.4", "tramer_l0")
POOL_SPLIT_SEED = 7
VAL_FRACTION = 0.2
TIE_POLICY = "drop"  # training/validation: human labels from the raters' votes; ties are dropped


@dataclass(frozen=True)
class Pool:
    """Labelled images in memory: float32 (N, 28, 28, 1) in [0, 1] and int64 labels."""

    x: np.ndarray
    y: np.ndarray
    name: str

    def __post_init__(self) -> None:
        check_images(self.x, scale="unit", what=f"pool {self.name}")
        check_labels(self.y, n=self.x.shape[0], what=f"pool {self.name} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class InvPools:
    """Training and validation examples (one entry per source set), split by source image."""

    train: list[InvarianceSet]
    val: list[InvarianceSet]
    label_source: str

    def train_pool(self) -> Pool:
        x = np.concatenate([s.images for s in self.train])
        y = np.concatenate([labels_for(s, self.label_source) for s in self.train])
        return Pool(x, y, f"inv-train[{self.label_source}]")

    @property
    def used_sets(self) -> list[InvarianceSet]:
        """Everything the model sees during training or model selection (for the leakage guard)."""
        return [*self.train, *self.val]

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.train)


def labels_for(s: InvarianceSet, source: str) -> np.ndarray:
    """The label each example is trained with; refuses a source the set does not have."""
    if source not in LABEL_SOURCES:
        raise ConfigError(
            f"unknown inv_label_source {source!r}; choose one of {list(LABEL_SOURCES)}"
        )
    labels = {"human": s.human_label, "target": s.target_label, "original": s.original_label}[
        source
    ]
    if (labels < 0).any():
        raise ConfigError(
            f"inv_label_source={source!r} but {int((labels < 0).sum())} examples of {s.name} have "
            f"no {source} label; label them first (robustlab label) or choose another label source"
        )
    return labels


def load_pool_set(spec: str, data_dir: str | os.PathLike | None) -> InvarianceSet:
    """A pool set by name (see robustlab.data.invariance) or a label-store file (*.json).

    Sets with per-rater votes get their human labels under TIE_POLICY; examples that end up
    without a human label (ties, "not a digit") are kept here and dropped by `load_inv_pools`.
    """
    if spec.endswith(".json"):
        return LabelStore.load(spec).to_invariance_set(TIE_POLICY)
    s = load_invariance_set(spec, data_dir)
    return load_invariance_set(spec, data_dir, tie_policy=TIE_POLICY) if s.votes is not None else s


def load_inv_pools(
    data_dir: str | os.PathLike | None,
    label_source: str = "human",
    sets: tuple[str, ...] = TRAIN_POOL_SETS,
) -> InvPools:
    """Training/validation pools from `sets`, each split by source image (no source in both)."""
    if not sets:
        raise ConfigError("inv_pool is empty; name at least one labelled invariance set")
    train, val = [], []
    for spec in sets:
        s = load_pool_set(spec, data_dir)
        if label_source == "human":
            if not (s.human_label >= 0).any():
                raise ConfigError(
                    f"inv_label_source='human' but {s.name} has no human labels (unlabelled "
                    "candidates); label them with `robustlab label` or choose another label source"
                )
            s = s.take(np.flatnonzero(s.human_label >= 0))
        labels_for(s, label_source)
        sources = np.unique(s.source_index)
        rng = np.random.default_rng(POOL_SPLIT_SEED)
        n_val = round(VAL_FRACTION * len(sources))
        is_val = np.isin(s.source_index, rng.choice(sources, size=n_val, replace=False))
        tr, va = s.take(np.flatnonzero(~is_val)), s.take(np.flatnonzero(is_val))
        if len(tr) == 0 or len(va) == 0:
            raise ConfigError(
                f"the invariance pool {s.name} has {len(s)} usable examples: too few to split by "
                "source image into training and validation; add labelled examples"
            )
        train.append(tr)
        val.append(va)
    return InvPools(train, val, label_source)


def load_eval_sets(
    data_dir: str | os.PathLike | None, excluded: np.ndarray
) -> dict[str, InvarianceSet]:
    """Tramèr's sets minus every example whose source image the model trained on."""
    out = {}
    for name in EVAL_SETS:
        s = load_invariance_set(name, data_dir)
        keep = (
            ~np.isin(s.source_index, excluded)
            if s.source_split == "test"
            else np.ones(len(s), bool)
        )
        out[name] = s.take(np.flatnonzero(keep))
    return out
