"""TRADES (Zhang et al. 2019) as a training method: its loss, its inner maximisation, beta = 0."""

from __future__ import annotations

import math

import numpy as np
import pytest


def _method(beta: float, steps: int = 3, eps: float = 0.3, step: float = 0.05):
    from robustlab.config import AttackConfig
    from robustlab.train.methods import make_method

    return make_method(
        AttackConfig(eps=eps, steps=steps, step_size=step, method="trades", trades_beta=beta)
    )


def test_trades_loss_matches_values_computed_by_hand():
    import tensorflow as tf

    # row 0 is adversarial: clean logits all 0 (uniform, CE = log 10); its adversarial logits
    # raise class 0 by log 2 (q0 = 2/11, the others 1/11): KL = log 1.1 - 0.1 log 2.
    # row 1 is clean: logits (log 3, 0, ..., 0), label 0: p0 = 3/12, CE = log 4.
    clean = np.zeros((2, 10), np.float32)
    clean[1, 0] = math.log(3.0)
    adv = np.zeros((1, 10), np.float32)
    adv[0, 0] = math.log(2.0)
    logits = tf.constant(np.concatenate([clean, adv]))
    y = tf.constant([3, 0], tf.int64)
    kl = math.log(1.1) - 0.1 * math.log(2.0)  # 0.0259955...
    for beta in (0.0, 1.0, 6.0):
        loss, own = _method(beta).loss(y, logits, tf.constant(1))
        expected = (math.log(10.0) + beta * kl + math.log(4.0)) / 2
        assert float(loss) == pytest.approx(expected, rel=1e-6)
        np.testing.assert_array_equal(own.numpy(), clean)  # accuracy is on the clean rows
    # with both rows adversarial (adversarials equal to the clean rows: KL 0) it is the mean CE
    loss, _ = _method(6.0).loss(y, tf.constant(np.concatenate([clean, clean])), tf.constant(2))
    assert float(loss) == pytest.approx((math.log(10.0) + math.log(4.0)) / 2, rel=1e-6)


def test_trades_inner_maximisation_stays_in_the_ball_and_raises_the_kl():
    import tensorflow as tf

    from robustlab.attacks.tf_attacks import kl_divergence
    from tests.test_attacks import trained_model

    model, test = trained_model()
    x, y = test.x[:128], test.y[:128]
    eps = 0.1
    method = _method(6.0, steps=10, eps=eps, step=0.025)
    x_adv = tf.function(lambda a, b: method.perturb(model, a, b))(tf.constant(x), tf.constant(y))
    x_adv = x_adv.numpy()
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(x_adv - x).max() > eps / 2  # it moved away from the 0.001-noise start
    clean_logits = model(x, training=False)
    kl = kl_divergence(clean_logits, model(x_adv, training=False)).numpy()
    noise = np.clip(x + 0.001 * np.random.default_rng(0).standard_normal(x.shape), 0, 1)
    kl_start = kl_divergence(clean_logits, model(noise.astype(np.float32), training=False))
    assert kl.mean() > 1000 * abs(float(np.mean(kl_start))) and kl.mean() > 0.01


def test_trades_with_beta_zero_is_clean_training():
    import keras
    import tensorflow as tf

    from robustlab.data.mnist import load_mnist
    from robustlab.models import build_model
    from robustlab.train.loop import make_train_step

    data = load_mnist(train_size=256)
    x, y = tf.constant(data.train.x[:64]), tf.constant(data.train.y[:64])
    keras.utils.set_random_seed(0)
    start = build_model("madry_cnn").get_weights()
    after = {}
    for name, method in (("clean", None), ("trades0", _method(0.0)), ("trades6", _method(6.0))):
        model = build_model("madry_cnn")
        model.set_weights(start)
        step = make_train_step(model, keras.optimizers.SGD(0.1), method)
        loss, _ = step(x, y, tf.constant(64, tf.int32))
        after[name] = (float(loss), model.get_weights())
    assert after["trades0"][0] == pytest.approx(after["clean"][0], rel=1e-5)
    for a, b in zip(after["trades0"][1], after["clean"][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # beta > 0 changes the update (the KL term is live)
    assert any(
        not np.allclose(a, b, rtol=1e-4, atol=1e-6)
        for a, b in zip(after["trades6"][1], after["clean"][1], strict=True)
    )
