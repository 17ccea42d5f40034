"""The thesis / Madry et al. MNIST CNN."""

from __future__ import annotations

import keras
from keras import layers

from robustlab.models.registry import register_model


def madry_layers(pool_first: bool = True) -> list[keras.layers.Layer]:
    """conv 5x5x32 -> maxpool 2 + ReLU -> conv 5x5x64 -> maxpool 2 + ReLU -> dense 1024 -> logits.

    `pool_first` (the default since issue 20) max-pools each convolution's output before its
    ReLU: ReLU is monotone, so max(relu(a)) == relu(max(a)) exactly and the model computes the
    same function (and the same gradients, almost everywhere) as the relu-then-pool order of
    Madry et al., with a quarter of the ReLU work. The weights are the same in both orders."""

    def block(filters: int) -> list[keras.layers.Layer]:
        if pool_first:
            return [
                layers.Conv2D(filters, 5, padding="same"),
                layers.MaxPooling2D(2),
                layers.ReLU(),
            ]
        return [
            layers.Conv2D(filters, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
        ]

    return [
        keras.Input(shape=(28, 28, 1), name="image"),
        *block(32),
        *block(64),
        layers.Flatten(),
        layers.Dense(1024, activation="relu"),
        layers.Dense(10, name="logits", dtype="float32"),  # float32 under mixed precision
    ]


@register_model("madry_cnn")
def madry_cnn(pool_first: bool = True) -> keras.Model:
    """The Madry et al. CNN (see `madry_layers`); the layers take the global dtype policy (see
    `build_model`), the logits layer is float32."""
    return keras.Sequential(madry_layers(pool_first), name="madry_cnn")
