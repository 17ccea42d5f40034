"""The ART classifier every ART attack runs on: a `TensorFlowV2Classifier` wrapping the model's
logits. The attacks themselves are built by name through `robustlab.attacks.registry.make_attack`
(one module per family in `robustlab.attacks.families`)."""

from __future__ import annotations

from robustlab.attacks.checks import check_logits


def make_classifier(model):
    """ART `TensorFlowV2Classifier` on the model's logits, clip values (0, 1), MNIST shape.

    A model that outputs probabilities is refused (ConfigError), see `checks.check_logits`.
    """
    import keras
    from art.estimators.classification import TensorFlowV2Classifier

    check_logits(model)

    return TensorFlowV2Classifier(
        model=model,
        nb_classes=10,
        input_shape=(28, 28, 1),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0),
    )
