"""Model loading refuses what it must not run. (The CLI's bad-input cases live in the bad-input
matrix, tests/test_bad_input.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from robustlab.errors import RobustlabError
from robustlab.tracking import load_keras_model

BIN = Path(sys.executable).parent  # the venv's console scripts (used by other tests)


def test_an_init_model_with_the_wrong_input_shape_is_refused(tmp_path):
    cifar_like = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    mlflow.keras.save_model(cifar_like, str(tmp_path / "m"))
    with pytest.raises(RobustlabError, match=r"expected input \(28, 28, 1\)"):
        load_keras_model(str(tmp_path / "m"))


def test_a_model_carrying_python_code_is_not_deserialized(tmp_path):
    """Keras safe_mode: a Lambda layer's code in a model file is never run on load."""
    with_code = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Lambda(lambda x: x * 2.0),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    assert with_code(np.zeros((1, 28, 28, 1), np.float32)).shape == (1, 10)
    mlflow.keras.save_model(with_code, str(tmp_path / "m"))
    with pytest.raises(RobustlabError, match="cannot load model.*arbitrary code execution"):
        load_keras_model(str(tmp_path / "m"))
