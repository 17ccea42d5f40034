"""The thesis / Madry et al. MNIST CNN."""

from __future__ import annotations

import keras
from keras import layers

from robustlab.models import register_model


@register_model("madry_cnn")
def madry_cnn() -> keras.Model:
    """conv 5x5x32 -> maxpool 2 -> conv 5x5x64 -> maxpool 2 -> dense 1024 -> dense 10 logits.

    The layers take the global dtype policy (see `build_model`); the logits layer is float32."""
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1), name="image"),
            layers.Conv2D(32, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(1024, activation="relu"),
            layers.Dense(10, name="logits", dtype="float32"),  # float32 under mixed precision
        ],
        name="madry_cnn",
    )
