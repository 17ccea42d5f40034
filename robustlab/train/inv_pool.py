"""The invariance data protocol: the training/validation pool and the evaluation sets.

Training and validation use the thesis eps 0.3 human-labelled set, split by source image;
evaluation uses Tramèr's sets. Which label a training example carries is explicit
(`human`, `target` or `original`), so the thesis's target-label run can be re-done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from robustlab.data.invariance import InvarianceSet, load_invariance_set
from robustlab.errors import ConfigError, DataError
from robustlab.evaluation.stats import accuracy, predict_logits
from robustlab.train.mixture import Pool

LABEL_SOURCES = ("human", "target", "original")
TRAIN_POOL_SETS = ("thesis_linf_eps0.3",)
EVAL_SETS = ("tramer_linf_eps0.3", "tramer_linf_eps0.4", "tramer_l0")
POOL_SPLIT_SEED = 7
VAL_FRACTION = 0.2
TIE_POLICY = "drop"  # training/validation: human labels from the raters' votes; ties are dropped


@dataclass(frozen=True)
class InvPools:
    train: InvarianceSet
    val: InvarianceSet
    label_source: str

    def train_pool(self) -> Pool:
        return Pool(
            self.train.images,
            labels_for(self.train, self.label_source),
            f"inv-train[{self.label_source}]",
        )

    @property
    def used_sets(self) -> list[InvarianceSet]:
        """Everything the model sees during training or model selection (for the leakage guard)."""
        return [self.train, self.val]


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
            f"inv_label_source={source!r} but {int((labels < 0).sum())} examples of {s.name} have no {source} label; "
            "label them first (robustlab label) or choose another label source"
        )
    return labels


def load_inv_pools(
    data_dir: str | os.PathLike | None,
    label_source: str = "human",
    sets: tuple[str, ...] = TRAIN_POOL_SETS,
) -> InvPools:
    """Training/validation pools, split by source image (no source in both)."""
    loaded = [_load_pool_set(name, data_dir) for name in sets]
    for s in loaded:
        labels_for(s, label_source)
    merged = loaded[0] if len(loaded) == 1 else _concat(loaded)
    sources = np.unique(merged.source_index)
    rng = np.random.default_rng(POOL_SPLIT_SEED)
    val_sources = rng.choice(
        sources, size=max(1, round(VAL_FRACTION * len(sources))), replace=False
    )
    is_val = np.isin(merged.source_index, val_sources)
    train, val = merged.take(np.flatnonzero(~is_val)), merged.take(np.flatnonzero(is_val))
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(
            "the invariance pool is empty after the split by source image; add labelled examples"
        )
    return InvPools(train, val, label_source)


def _load_pool_set(name: str, data_dir: str | os.PathLike | None) -> InvarianceSet:
    """A labelled pool set; sets with per-rater votes get their labels under TIE_POLICY."""
    s = load_invariance_set(name, data_dir)
    return load_invariance_set(name, data_dir, tie_policy=TIE_POLICY) if s.votes is not None else s


def _concat(sets: list[InvarianceSet]) -> InvarianceSet:
    if len({s.source_split for s in sets}) != 1:
        raise DataError("invariance training sets must come from one MNIST split")
    cat = lambda key: np.concatenate([getattr(s, key) for s in sets])  # noqa: E731
    return InvarianceSet(
        "+".join(s.name for s in sets),
        cat("images"),
        cat("original_label"),
        cat("target_label"),
        cat("human_label"),
        sets[0].source_split,
        cat("source_index"),
        sets[0].eps,
        sets[0].norm,
    )


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


def inv_accuracy(model, s: InvarianceSet, prefix: str) -> dict[str, float]:
    """Agreement with human labels overall, on label-changed and on label-kept examples, with 95% CIs."""
    pred = np.argmax(predict_logits(model, s.images), axis=1)
    correct = pred == s.human_label
    changed = s.label_changed
    metrics: dict[str, float] = {}
    for name, mask in (
        ("inv_acc", np.ones_like(changed)),
        ("inv_acc_changed", changed),
        ("inv_acc_kept", ~changed),
    ):
        if mask.any():
            metrics.update(
                accuracy(correct[mask]).as_metrics(
                    f"{prefix}/{name}" + (f"/{s.name}" if prefix == "test" else "")
                )
            )
    return metrics


def inv_validation(pools: InvPools):
    """Validator: val/inv_acc (agreement with human labels) on the validation pool."""

    def validate(model) -> dict[str, float]:
        pred = np.argmax(predict_logits(model, pools.val.images), axis=1)
        return {"val/inv_acc": float(np.mean(pred == pools.val.human_label))}

    return validate
