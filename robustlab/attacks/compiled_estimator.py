"""An ART `TensorFlowV2Classifier` whose loss and loss gradient run as compiled graphs.

ART's `TensorFlowV2Classifier.loss_gradient` and `compute_loss` run the model eagerly, op by op,
and the difference-of-logits-ratio loss that `AutoProjectedGradientDescent` builds for
TensorFlow loops over the batch in Python. On a robust MNIST model that made AutoAttack's two
APGD runs cost about 3x their arithmetic. This estimator computes the same losses (the same
formulas as ART's, vectorised) inside `tf.function`s; ART's attacks use it unchanged through
`loss_type=None` ("use the estimator's loss").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
from art.estimators.classification import TensorFlowV2Classifier
from art.utils import check_and_transform_label_format

from robustlab.errors import ConfigError

LOSS_TYPES = ("cross_entropy", "difference_logits_ratio")


def cross_entropy(y_onehot: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example softmax cross-entropy of the logits (ART APGD's "cross_entropy")."""
    return tf.nn.softmax_cross_entropy_with_logits(labels=y_onehot, logits=logits)


def difference_logits_ratio(y_onehot: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example DLR loss (Croce & Hein 2020) as ART APGD defines it, without its epsilon:
    -(z_y - max_{i != y} z_i) / (z_(1) - z_(3)), z_(k) the k-th largest logit."""
    is_y = y_onehot > 0.5
    z_y = tf.reduce_sum(tf.where(is_y, logits, tf.zeros_like(logits)), axis=1)
    z_other = tf.reduce_max(tf.where(is_y, tf.fill(tf.shape(logits), -np.inf), logits), axis=1)
    top3 = tf.math.top_k(logits, k=3).values
    return -(z_y - z_other) / (top3[:, 0] - top3[:, 2])


_LOSSES = {"cross_entropy": cross_entropy, "difference_logits_ratio": difference_logits_ratio}
_REDUCE = {"none": lambda v: v, "mean": tf.reduce_mean, "sum": tf.reduce_sum}


class _Loss:
    """`loss_object` with ART's interface (`reduction` attribute, (y_true, y_pred) call), so
    that any stock ART path that reads it computes the same loss."""

    def __init__(self, loss_type: str) -> None:
        self.fn = _LOSSES[loss_type]
        self.reduction = "mean"

    def __call__(
        self, y_true: tf.Tensor, y_pred: tf.Tensor, *args: Any, **kwargs: Any
    ) -> tf.Tensor:
        return _REDUCE[str(self.reduction)](self.fn(tf.cast(y_true, y_pred.dtype), y_pred))


class CompiledLossClassifier(TensorFlowV2Classifier):
    """ART classifier on `model`'s logits, clip values (0, 1), whose `loss_gradient` (of the
    batch-mean loss, as ART's) and `compute_loss` run compiled; no preprocessing."""

    def __init__(self, model, loss_type: str, *, nb_classes: int, input_shape: tuple[int, ...]):
        if loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}"
            )
        loss = _Loss(loss_type)
        super().__init__(
            model=model,
            nb_classes=nb_classes,
            input_shape=input_shape,
            loss_object=loss,
            clip_values=(0.0, 1.0),
        )
        fn = loss.fn

        @tf.function(reduce_retracing=True)
        def losses(x: tf.Tensor, y: tf.Tensor, training: bool) -> tf.Tensor:
            return fn(y, model(x, training=training))

        @tf.function(reduce_retracing=True)
        def mean_loss_gradient(x: tf.Tensor, y: tf.Tensor, training: bool) -> tf.Tensor:
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_mean(losses(x, y, training))
            return tape.gradient(loss, x)

        self._losses = losses
        self._mean_loss_gradient = mean_loss_gradient

    def _tensors(self, x, y) -> tuple[tf.Tensor, tf.Tensor]:
        y = check_and_transform_label_format(np.asarray(y), self.nb_classes)
        return tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.float32)

    def loss_gradient(self, x, y, training_mode: bool = False, **kwargs: Any) -> np.ndarray:
        xt, yt = self._tensors(x, y)
        return self._mean_loss_gradient(xt, yt, bool(training_mode)).numpy()

    def compute_loss(
        self, x, y, reduction: str = "none", training_mode: bool = False, **kwargs: Any
    ) -> np.ndarray:
        xt, yt = self._tensors(x, y)
        return _REDUCE[reduction](self._losses(xt, yt, bool(training_mode))).numpy()
