"""Attacks: the ART factory, the TF training-time attack, and their equivalence on a trained model."""

from __future__ import annotations

import functools

import numpy as np
import pytest


@functools.cache
def trained_model():
    """madry_cnn trained by robustlab's own loop on 8k MNIST images: 1 clean epoch, then 3
    FGSM-RS epochs at eps 0.3 with a 1-epoch eps warm-up, so that it is partly robust at 0.3.

    Cached per process so that test_evaluate.py reuses it. Returns (model, test split).
    """
    import keras

    from robustlab.config import AttackConfig, MixConfig, TrainConfig
    from robustlab.data.mnist import load_mnist
    from robustlab.models import build_model
    from robustlab.train.loop import fit
    from robustlab.train.methods import make_method
    from robustlab.train.mixture import Mixture, Pool

    data = load_mnist(train_size=8000)
    keras.utils.set_random_seed(0)
    model = build_model("madry_cnn")
    pool = Pool(data.train.x, data.train.y, "mnist")
    clean = TrainConfig(epochs=1, batch_size=128, patience=0)
    fit(
        model, keras.optimizers.Adam(1e-3), Mixture(pool, MixConfig(), 128), clean, 1, validators=[]
    )
    attack = AttackConfig(eps=0.3, steps=1, step_size=0.375, method="fgsm_rs")
    adversarial = Mixture(pool, MixConfig(clean=0.0, ptb=1.0), 128)
    fit(
        model,
        keras.optimizers.Adam(1e-3),
        adversarial,
        TrainConfig(epochs=3, batch_size=128, patience=0),
        3,
        validators=[],
        method=make_method(attack),
        eps_warmup=1.0,
    )
    return model, data.test


@pytest.fixture(scope="module")
def model_and_test():
    return trained_model()


def _acc(model, x, y) -> float:
    from robustlab.evaluation.stats import predict_logits

    return float((predict_logits(model, x, 500).argmax(1) == y).mean())


def test_tf_attacks_reject_bad_config():
    from robustlab.attacks import make_perturb_fn, pgd_attack
    from robustlab.config import AttackConfig
    from robustlab.errors import ConfigError

    with pytest.raises(ConfigError, match="eps"):
        make_perturb_fn(AttackConfig(eps=2.0))
    with pytest.raises(ConfigError, match="attack_steps"):
        make_perturb_fn(AttackConfig(steps=0))
    with pytest.raises(ConfigError, match="step_size"):
        pgd_attack(
            None,
            np.zeros((1, 28, 28, 1), np.float32),
            np.zeros(1),
            eps=0.3,
            steps=3,
            step_size=-1.0,
        )


def test_classifier_outputs_the_models_logits(model_and_test):
    from robustlab.attacks import make_classifier

    model, test = model_and_test
    x = test.x[:50]
    clf = make_classifier(model)
    pred = clf.predict(x)
    np.testing.assert_allclose(pred, np.asarray(model(x, training=False)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(pred.sum(axis=1), 1.0, atol=1e-3)  # logits, not probabilities
    assert pred.min() < 0.0
    assert clf.clip_values is not None and tuple(np.asarray(clf.clip_values).ravel()) == (0.0, 1.0)


# --- the training-time TF attack ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs"])
def test_perturb_stays_in_ball_and_box_and_raises_the_loss(model_and_test, method):
    import tensorflow as tf

    from robustlab.attacks import make_perturb_fn
    from robustlab.config import AttackConfig

    model, test = model_and_test
    eps = 0.1
    step = 0.125 if method == "fgsm_rs" else 0.025
    perturb = make_perturb_fn(AttackConfig(eps=eps, steps=10, step_size=step, method=method))

    @tf.function(reduce_retracing=True)  # how the lead's train step calls it: traced, dynamic B
    def run(x, y):
        return perturb(model, x, y)

    x, y = test.x[:200], test.y[:200]
    x_adv = run(tf.constant(x), tf.constant(y)).numpy()
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(x_adv - x).max() > eps / 2  # it moved

    def mean_loss(images):
        logits = model(images, training=False)
        return float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)))

    assert mean_loss(x_adv) > mean_loss(x) + 0.05
    assert _acc(model, x_adv, y) < _acc(model, x, y)
    empty = run(tf.zeros((0, 28, 28, 1)), tf.zeros((0,), tf.int64))
    assert tuple(empty.shape) == (0, 28, 28, 1)


def test_perturb_output_carries_no_gradient(model_and_test):
    import tensorflow as tf

    from robustlab.attacks import make_perturb_fn
    from robustlab.config import AttackConfig

    model, test = model_and_test
    perturb = make_perturb_fn(AttackConfig(eps=0.1, steps=2, step_size=0.05))
    x = tf.constant(test.x[:8])
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = tf.reduce_sum(perturb(model, x, tf.constant(test.y[:8])))
    assert tape.gradient(out, x) is None


def test_pgd_attack_restarts_keep_the_worst_case(model_and_test):
    from robustlab.attacks import pgd_attack

    model, test = model_and_test
    x, y = test.x[:200], test.y[:200]
    kw = {"eps": 0.15, "steps": 10, "step_size": 0.04, "batch_size": 200, "seed": 3}
    one = pgd_attack(model, x, y, restarts=1, **kw)
    again = pgd_attack(model, x, y, restarts=1, **kw)
    np.testing.assert_array_equal(one, again)  # seeded
    three = pgd_attack(model, x, y, restarts=3, **kw)  # its first restart is `one`
    assert np.abs(three - x).max() <= 0.15 + 1e-6
    wrong1 = model.predict(one, verbose=0).argmax(1) != y
    wrong3 = model.predict(three, verbose=0).argmax(1) != y
    assert np.all(wrong3[wrong1])  # every example broken by restart 1 stays broken


# --- equivalence with ART ---------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_pgd40_matches_art_projected_gradient_descent(model_and_test, eps):
    """Issue 3: the training attack is the same attack as ART's PGD (robust acc within 1 pp)."""
    from robustlab.attacks import make_attack, make_classifier, pgd_attack

    model, test = model_and_test
    x, y = test.x[:300], test.y[:300]
    step = 2.5 * eps / 40
    ours = pgd_attack(
        model, x, y, eps=eps, steps=40, step_size=step, random_start=False, batch_size=300
    )
    art = make_attack(
        "pgd", make_classifier(model), eps=eps, steps=40, step_size=step, restarts=0, batch_size=300
    ).generate(x, y)
    acc_ours, acc_art, clean = _acc(model, ours, y), _acc(model, art, y), _acc(model, x, y)
    assert clean > 0.9
    assert acc_ours < clean - 0.02  # the attack does something on this model
    print(f"eps {eps}: clean {clean:.3f}, PGD-40 robustlab {acc_ours:.3f}, ART {acc_art:.3f}")
    assert abs(acc_ours - acc_art) <= 0.01, (acc_ours, acc_art)
    # and per example, the same outcome almost everywhere
    same = (model.predict(ours, verbose=0).argmax(1) == y) == (
        model.predict(art, verbose=0).argmax(1) == y
    )
    assert same.mean() >= 0.98


@pytest.mark.parametrize("loss_type", ["cross_entropy", "difference_logits_ratio"])
def test_compiled_apgd_estimator_matches_arts_own_loss(model_and_test, loss_type):
    """The compiled estimator behind our APGD computes ART APGD's own loss and gradient, and
    APGD reaches the same robust accuracy with it as with ART's eager estimator."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    from robustlab.attacks import make_attack, make_classifier

    model, test = model_and_test
    rng = np.random.default_rng(0)
    x = np.clip(test.x[:200] + rng.uniform(-0.3, 0.3, test.x[:200].shape), 0, 1)
    x = x.astype(np.float32)
    y = np.eye(10, dtype=np.float32)[test.y[:200]]
    kw = dict(norm=np.inf, eps=0.3, eps_step=0.6, max_iter=10, nb_random_init=1, batch_size=200)
    art = AutoProjectedGradientDescent(
        make_classifier(model), loss_type=loss_type, verbose=False, **kw
    )
    ours = make_attack(
        "apgd", make_classifier(model), eps=0.3, steps=10, batch_size=200, loss_type=loss_type
    )
    assert type(ours.estimator) is not type(art.estimator)
    np.testing.assert_allclose(
        ours.estimator.compute_loss(x, y), art.estimator.compute_loss(x, y), rtol=1e-4, atol=1e-5
    )
    g_ours, g_art = ours.estimator.loss_gradient(x, y), art.estimator.loss_gradient(x, y)
    assert np.abs(g_art).max() > 0
    np.testing.assert_allclose(g_ours, g_art, rtol=1e-3, atol=1e-3 * np.abs(g_art).max())
    accs = []
    for attack in (ours, art):
        np.random.seed(1)
        accs.append(_acc(model, attack.generate(test.x[:200], test.y[:200]), test.y[:200]))
    print(f"{loss_type}: APGD-10 robust acc compiled {accs[0]:.3f}, ART eager {accs[1]:.3f}")
    assert accs[1] < _acc(model, test.x[:200], test.y[:200]) - 0.02  # the attack bites
    assert abs(accs[0] - accs[1]) <= 0.01


def test_an_attacked_model_is_released_when_dropped():
    """pgd_attack's per-model graph cache must not keep models alive: `tune` and `register`
    attack many models in one process (issue 11: about 19 MiB per model stayed resident)."""
    import gc
    import weakref

    from robustlab.attacks import pgd_attack
    from robustlab.models import build_model

    x = np.random.default_rng(0).random((32, 28, 28, 1), dtype=np.float32)
    y = np.zeros(32, dtype=np.int64)
    model = build_model("madry_cnn")
    pgd_attack(model, x, y, eps=0.3, steps=2, step_size=0.1, batch_size=32, seed=0)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
