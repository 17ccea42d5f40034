"""TRADES' MNIST SmallCNN (Zhang et al. 2019): four 3x3 convolutions, two dense layers of 200."""

from __future__ import annotations

import keras
from keras import layers

from robustlab.models.registry import register_model


def small_cnn_layers(pool_first: bool = True) -> list[keras.layers.Layer]:
    """conv 3x3x32 + ReLU -> conv 3x3x32 -> maxpool 2 + ReLU -> conv 3x3x64 + ReLU -> conv 3x3x64
    -> maxpool 2 + ReLU -> dense 200 + ReLU -> dropout 0.5 -> dense 200 + ReLU -> 10 logits.

    As TRADES' PyTorch SmallCNN: unpadded convolutions (28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4),
    a ReLU after every convolution and hidden dense layer, dropout 0.5 after the first dense
    layer; 312,202 parameters. `pool_first` (the default) max-pools the second convolution of
    each pair before its ReLU: ReLU is monotone, so max(relu(a)) == relu(max(a)) and the model
    computes the same function as TRADES' relu-then-pool order, with a quarter of those ReLUs.
    The weights are the same in both orders."""

    def pair(filters: int) -> list[keras.layers.Layer]:
        first = layers.Conv2D(filters, 3, activation="relu")
        if pool_first:
            return [first, layers.Conv2D(filters, 3), layers.MaxPooling2D(2), layers.ReLU()]
        return [first, layers.Conv2D(filters, 3, activation="relu"), layers.MaxPooling2D(2)]

    return [
        keras.Input(shape=(28, 28, 1), name="image"),
        *pair(32),
        *pair(64),
        layers.Flatten(),
        layers.Dense(200, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(200, activation="relu"),
        layers.Dense(10, name="logits", dtype="float32"),  # float32 under mixed precision
    ]


@register_model("small_cnn")
def small_cnn(pool_first: bool = True) -> keras.Model:
    """TRADES' SmallCNN (see `small_cnn_layers`); the layers take the global dtype policy (see
    `build_model`), the logits layer is float32."""
    return keras.Sequential(small_cnn_layers(pool_first), name="small_cnn")
