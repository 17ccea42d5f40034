from __future__ import annotations

import numpy as np
import pytest

from robustlab.errors import ConfigError
from robustlab.models import available_models, build_model


def test_madry_cnn_architecture_outputs_logits():
    model = build_model("madry_cnn")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == [  # max-pooling before ReLU (issue 20): the same function, less ReLU work
        "Conv2D",
        "MaxPooling2D",
        "ReLU",
        "Conv2D",
        "MaxPooling2D",
        "ReLU",
        "Flatten",
        "Dense",
        "Dense",
    ]
    assert model.layers[0].kernel_size == (5, 5) and model.layers[0].filters == 32
    assert model.layers[0].get_config()["activation"] == "linear"
    assert model.layers[3].filters == 64 and model.layers[7].units == 1024
    assert model.layers[-1].get_config()["activation"] == "linear"
    out = np.asarray(model(np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)))
    assert out.shape == (4, 10)
    assert not np.allclose(out.sum(axis=1), 1.0)  # logits, not probabilities


def test_unknown_model_name_is_a_clear_error():
    assert "madry_cnn" in available_models()
    with pytest.raises(ConfigError, match="unknown model 'resnet'"):
        build_model("resnet")


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_pool_before_relu_computes_what_relu_before_pool_computed(precision, tmp_path):
    """madry_cnn max-pools before its ReLUs; a model built (and saved) with the old order, given
    the same weights, gives the same logits on real MNIST images, and still loads and predicts."""
    import keras

    from robustlab.data.mnist import load_mnist
    from robustlab.models.cnn import madry_layers
    from robustlab.precision import precision_scope

    x = load_mnist().test.x[:512]
    keras.utils.set_random_seed(1)
    new = build_model("madry_cnn", precision)
    with precision_scope(precision):
        old = keras.Sequential(madry_layers(pool_first=False), name="madry_cnn")
    old.set_weights(new.get_weights())  # same weights, same order: checkpoints carry over
    a, b = np.asarray(new(x, training=False)), np.asarray(old(x, training=False))
    atol = 0.0 if precision == "float32" else 0.02  # bf16: the fused conv+ReLU rounds elsewhere
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.99
    path = tmp_path / "old.keras"
    old.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert [type(layer).__name__ for layer in loaded.layers][:2] == ["Conv2D", "MaxPooling2D"]
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), b)


def test_small_cnn_is_trades_smallcnn_with_its_parameter_count():
    """TRADES' MNIST SmallCNN: unpadded 3x3 convs 32-32-64-64, a max-pool after each pair,
    dense 200-200-10 with dropout 0.5 after the first; about 0.31 M parameters."""
    model = build_model("small_cnn")
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    dense = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
    assert [c.filters for c in convs] == [32, 32, 64, 64]
    assert {c.kernel_size for c in convs} == {(3, 3)} and {c.padding for c in convs} == {"valid"}
    assert [d.units for d in dense] == [200, 200, 10]
    assert [type(layer).__name__ for layer in model.layers].count("Dropout") == 1
    assert model.count_params() == 312_202
    assert tuple(model.output_shape) == (None, 10)
    assert model.layers[-1].get_config()["activation"] == "linear"  # logits


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_small_cnn_pool_before_relu_equals_trades_order(precision, tmp_path):
    """small_cnn max-pools its second convolution of each pair before the ReLU; TRADES' order
    (ReLU, then pool) with the same weights gives the same logits on real MNIST images, and a
    saved small_cnn reloads with equal predictions."""
    import keras

    from robustlab.data.mnist import load_mnist
    from robustlab.models.small_cnn import small_cnn_layers
    from robustlab.precision import precision_scope

    x = load_mnist().test.x[:512]
    keras.utils.set_random_seed(2)
    new = build_model("small_cnn", precision)
    with precision_scope(precision):
        old = keras.Sequential(small_cnn_layers(pool_first=False), name="small_cnn")
    old.set_weights(new.get_weights())
    a, b = np.asarray(new(x, training=False)), np.asarray(old(x, training=False))
    atol = 0.0 if precision == "float32" else 0.02
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.99
    path = tmp_path / "small.keras"
    new.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), a)
