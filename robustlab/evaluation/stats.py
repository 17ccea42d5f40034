"""Accuracy with a 95% Wilson score interval, and batched predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class Accuracy:
    value: float
    ci_low: float
    ci_high: float
    n: int

    def as_metrics(self, name: str) -> dict[str, float]:
        """{name: acc, name_ci_low: .., name_ci_high: ..} for MLflow."""
        return {name: self.value, f"{name}_ci_low": self.ci_low, f"{name}_ci_high": self.ci_high}


def accuracy(correct: np.ndarray, confidence: float = 0.95) -> Accuracy:
    """Share of True in `correct` with its Wilson score interval (NaN for an empty array)."""
    correct = np.asarray(correct, dtype=bool)
    n = int(correct.size)
    if n == 0:
        return Accuracy(float("nan"), float("nan"), float("nan"), 0)
    k = int(correct.sum())
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Accuracy(k / n, float(ci.low), float(ci.high), n)


def predict_logits(model, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Logits of `model` on float32 images in [0, 1], in batches, dropout off."""
    out = [
        np.asarray(model(x[i : i + batch_size], training=False))
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.empty((0, 10), dtype=np.float32)
