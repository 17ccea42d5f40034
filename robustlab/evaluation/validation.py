"""Validation metrics: what training, tuning and registering measure on held-out data.

Validators map a model to `{metric: value}` and run after every epoch (`robustlab.train.loop`):
clean accuracy and loss on the validation split, PGD-10 accuracy on a fixed validation subset,
agreement with human labels on the invariance validation pool. `inv_accuracy` and
`balanced_inv_accuracy` split agreement with human labels into label-changed and label-kept
examples (balanced: their mean, 0.5 for a model that never changes its answer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from robustlab.data.invariance import InvarianceSet
from robustlab.data.mnist import Split
from robustlab.data.pools import InvPools, labels_for
from robustlab.errors import ConfigError, DataError
from robustlab.evaluation.stats import accuracy, predict_logits

Validator = Callable[[Any], dict[str, float]]  # a Keras model -> {metric: value}
VAL_ATTACK_SIZE = 500  # validation images attacked (PGD-10) for val/pgd_acc and sel/pgd_acc
VAL_PGD_STEPS = 10


def clean_validation(val: Split, batch_size: int = 1000) -> Validator:
    """val/loss and val/clean_acc on the clean validation split."""
    import keras

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def validate(model) -> dict[str, float]:
        logits = predict_logits(model, val.x, batch_size)
        return {
            "val/loss": float(loss_fn(val.y, logits)),
            "val/clean_acc": float(np.mean(np.argmax(logits, axis=1) == val.y)),
        }

    return validate


def pgd_validation(val_x: np.ndarray, val_y: np.ndarray, eps: float) -> Validator:
    """val/pgd_acc: PGD-10 (step eps / 4, one seeded random start) on (val_x, val_y)."""
    from robustlab.attacks.tf_attacks import pgd_attack

    def validate(model) -> dict[str, float]:
        x_adv = pgd_attack(
            model,
            val_x,
            val_y,
            eps=eps,
            steps=VAL_PGD_STEPS,
            step_size=eps / 4,
            random_start=True,
            batch_size=VAL_ATTACK_SIZE,
            seed=0,
        )
        pred = np.argmax(predict_logits(model, x_adv), axis=1)
        return {"val/pgd_acc": float(np.mean(pred == val_y))}

    return validate


def inv_accuracy(model, s: InvarianceSet, prefix: str) -> dict[str, float]:
    """Agreement with human labels overall, on label-changed and on label-kept examples (95% CIs),
    and balanced (`inv_bal_acc`: the mean of changed and kept) when both groups are present."""
    pred = np.argmax(predict_logits(model, s.images), axis=1)
    correct = pred == s.human_label
    changed = s.label_changed
    metrics: dict[str, float] = {}
    suffix = f"/{s.name}" if prefix == "test" else ""
    for name, mask in (
        ("inv_acc", np.ones_like(changed)),
        ("inv_acc_changed", changed),
        ("inv_acc_kept", ~changed),
    ):
        if mask.any():
            metrics.update(accuracy(correct[mask]).as_metrics(f"{prefix}/{name}{suffix}"))
    if (
        changed.any() and (~changed).any()
    ):  # balanced: a model that never changes its answer gets 0.5
        metrics[f"{prefix}/inv_bal_acc{suffix}"] = (
            metrics[f"{prefix}/inv_acc_changed{suffix}"] + metrics[f"{prefix}/inv_acc_kept{suffix}"]
        ) / 2
    return metrics


def inv_validation(pools: InvPools):
    """Validator: val/inv_acc on the validation pool, scored against the labels the regime
    trains on (`pools.label_source`: a target-label regime is selected on target labels); on
    human labels it is the balanced accuracy (mean of label-changed and label-kept) when the
    pool holds both, as the report judges it."""
    images = np.concatenate([s.images for s in pools.val])
    labels = np.concatenate([labels_for(s, pools.label_source) for s in pools.val])
    changed = np.concatenate([s.label_changed for s in pools.val])
    balanced = pools.label_source == "human" and changed.any() and (~changed).any()

    def validate(model) -> dict[str, float]:
        if not len(labels):
            return {}
        correct = np.argmax(predict_logits(model, images), axis=1) == labels
        if balanced:
            return {"val/inv_acc": float((correct[changed].mean() + correct[~changed].mean()) / 2)}
        return {"val/inv_acc": float(correct.mean())}

    return validate


def selection_validation(
    sets: list[InvarianceSet], prefix: str = "val/sel"
) -> Callable[[object], dict[str, float]]:
    """Validator: plain and balanced invariance accuracy on a selection set (see
    robustlab.data.tramer_halves): `<prefix>_inv_acc`, `<prefix>_inv_bal_acc`."""
    sets = [s.take(np.flatnonzero(s.human_label >= 0)) for s in sets]
    images = np.concatenate([s.images for s in sets])
    human = np.concatenate([s.human_label for s in sets])
    changed = np.concatenate([s.label_changed for s in sets])
    if not changed.any() or changed.all():
        raise ConfigError("the selection set needs both label-changed and label-kept examples")

    def validate(model) -> dict[str, float]:
        correct = np.argmax(predict_logits(model, images), axis=1) == human
        bal = (correct[changed].mean() + correct[~changed].mean()) / 2
        return {f"{prefix}_inv_acc": float(correct.mean()), f"{prefix}_inv_bal_acc": float(bal)}

    return validate


def balanced_inv_accuracy(
    model, sets: Mapping[str, InvarianceSet] | Iterable[InvarianceSet], prefix: str
) -> dict[str, float]:
    """Agreement with human labels pooled over `sets`: plain, changed, kept, balanced, counts.

    Keys: `<prefix>/inv_acc`, `<prefix>/inv_acc_changed`, `<prefix>/inv_acc_kept`,
    `<prefix>/inv_bal_acc` (mean of changed and kept; NaN when either group is empty),
    `<prefix>/n_inv_changed`, `<prefix>/n_inv_kept`. Examples without a human label are skipped.
    """
    items = list(sets.values()) if isinstance(sets, Mapping) else list(sets)
    items = [s for s in items if len(s)]
    if not items:
        raise DataError("balanced_inv_accuracy: no invariance examples to evaluate")
    images = np.concatenate([s.images for s in items])
    human = np.concatenate([s.human_label for s in items])
    changed = np.concatenate([s.label_changed for s in items])
    known = human >= 0
    pred = np.argmax(predict_logits(model, images[known]), axis=1)
    correct, changed = pred == human[known], changed[known]
    plain = accuracy(correct).value
    acc_changed = accuracy(correct[changed]).value
    acc_kept = accuracy(correct[~changed]).value
    return {
        f"{prefix}/inv_acc": plain,
        f"{prefix}/inv_acc_changed": acc_changed,
        f"{prefix}/inv_acc_kept": acc_kept,
        f"{prefix}/inv_bal_acc": (acc_changed + acc_kept) / 2,
        f"{prefix}/n_inv_changed": float(changed.sum()),
        f"{prefix}/n_inv_kept": float((~changed).sum()),
    }


INV_PREDICTIONS_ARTIFACT = "inv_predictions.csv"
INV_PREDICTION_COLUMNS = (
    "set",
    "index",  # the example's position in its set
    "source_split",
    "source_index",
    "original_label",
    "target_label",
    "human_label",
    "label_changed",
    "prediction",
    "correct",
)


def inv_prediction_rows(model, sets: Iterable[InvarianceSet]) -> list[dict[str, object]]:
    """One row per invariance example of `sets`: its provenance, labels and `model`'s prediction
    (`correct`: agrees with the human label; empty when the example has none)."""
    rows: list[dict[str, object]] = []
    for s in sets:
        if not len(s):
            continue
        pred = np.argmax(predict_logits(model, s.images), axis=1)
        for i in range(len(s)):
            human = int(s.human_label[i])
            rows.append(
                {
                    "set": s.name,
                    "index": int(s.ids[i]),
                    "source_split": s.source_split,
                    "source_index": int(s.source_index[i]),
                    "original_label": int(s.original_label[i]),
                    "target_label": int(s.target_label[i]),
                    "human_label": human,
                    "label_changed": int(bool(s.label_changed[i])),
                    "prediction": int(pred[i]),
                    "correct": "" if human < 0 else int(pred[i] == human),
                }
            )
    return rows


def log_inv_predictions(model, sets: Iterable[InvarianceSet], out_dir) -> None:
    """Write `inv_predictions.csv` (see `inv_prediction_rows`) and log it to the active run."""
    import csv
    from pathlib import Path

    import mlflow

    path = Path(out_dir) / INV_PREDICTIONS_ARTIFACT
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(INV_PREDICTION_COLUMNS))
        writer.writeheader()
        writer.writerows(inv_prediction_rows(model, sets))
    mlflow.log_artifact(str(path))


def human_pool_accuracy(
    model, excluded: np.ndarray, data_dir=None, prefix: str = "test/human_pool"
) -> dict[str, float]:
    """Agreement with human labels on every human-labelled example whose MNIST source `excluded`
    does not hold (none of the model's training or selection sources touched it): label-changed,
    label-kept and balanced accuracy with the experiment's interval (hierarchical bootstrap over
    sources), and the counts they rest on. The same frame the experiment's report uses."""
    from robustlab.data.folds import load_human_pool
    from robustlab.evaluation.intervals import invariance_intervals

    pool = load_human_pool(data_dir)
    sets = [s.take(np.flatnonzero(~np.isin(s.source_index, excluded))) for s in pool.sets.values()]
    sets = [s for s in sets if len(s)]
    if not sets:
        return {}
    correct = np.concatenate(
        [np.argmax(predict_logits(model, s.images), axis=1) == s.human_label for s in sets]
    )[:, None]
    changed = np.concatenate([s.label_changed for s in sets])
    source = np.concatenate([s.source_index for s in sets])
    out: dict[str, float] = {}
    for name, (mean, low, high, n) in invariance_intervals(correct, changed, source).items():
        key = f"{prefix}_bal_acc" if name == "balanced" else f"{prefix}_acc_{name}"
        out.update({key: mean, f"{key}_ci_low": low, f"{key}_ci_high": high})
        if name != "balanced":
            out[f"{prefix}_n_{name}"] = float(n)
    return out
