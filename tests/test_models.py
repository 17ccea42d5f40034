from __future__ import annotations

import numpy as np
import pytest

from robustlab.errors import ConfigError
from robustlab.models import available_models, build_model


def test_madry_cnn_architecture_outputs_logits():
    model = build_model("madry_cnn")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == [
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Flatten",
        "Dense",
        "Dense",
    ]
    assert model.layers[0].kernel_size == (5, 5) and model.layers[0].filters == 32
    assert model.layers[2].filters == 64 and model.layers[5].units == 1024
    assert model.layers[-1].get_config()["activation"] == "linear"
    out = np.asarray(model(np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)))
    assert out.shape == (4, 10)
    assert not np.allclose(out.sum(axis=1), 1.0)  # logits, not probabilities


def test_unknown_model_name_is_a_clear_error():
    assert "madry_cnn" in available_models()
    with pytest.raises(ConfigError, match="unknown model 'resnet'"):
        build_model("resnet")
