"""P1 benchmark (run on demand, not in CI): adversarial-training and PGD-40 speed, robustlab vs ART.

In one process, the same madry_cnn, eps, steps, step size and batch size:
(a) PGD adversarial training, a fixed number of batches (after one warm-up batch each), per-batch
    time extrapolated to a 55,000-image epoch: robustlab's `make_perturb_fn` inside a
    `@tf.function` train step with Adam, vs ART's `AdversarialTrainerMadryPGD` (its classifier
    given a `train_step` so that TF does not retrace every batch);
(b) PGD-40 on `--n-attack` test images: robustlab's `pgd_attack` vs ART `ProjectedGradientDescent`.

    python bench/bench_adv_training.py --batches 5 --batch-size 128 --steps 40
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from robustlab.attacks import make_attack, make_classifier, make_perturb_fn, pgd_attack  # noqa: E402
from robustlab.config import AttackConfig  # noqa: E402
from robustlab.data.mnist import load_mnist  # noqa: E402
from robustlab.models import build_model  # noqa: E402
from robustlab.train.loop import make_train_step  # noqa: E402

EPOCH_IMAGES = 55_000


def fresh_model(weights) -> keras.Model:
    model = build_model("madry_cnn")
    model.set_weights(weights)
    return model


def time_robustlab_training(weights, x, y, *, eps, steps, step_size, batch_size, batches) -> float:
    """Seconds per batch of robustlab's own train step (every row attacked, as in Madry et al.)."""
    model = fresh_model(weights)
    perturb = make_perturb_fn(AttackConfig(eps=eps, steps=steps, step_size=step_size))
    train_step = make_train_step(model, keras.optimizers.Adam(1e-3), perturb)
    n_adv = tf.constant(batch_size, tf.int32)

    def batch(i):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        return tf.constant(x[sl]), tf.constant(y[sl].astype(np.int64)), n_adv

    train_step(*batch(0))[0].numpy()  # warm-up / trace
    t = time.perf_counter()
    for i in range(1, batches + 1):
        loss, _ = train_step(*batch(i))
    float(loss)
    return (time.perf_counter() - t) / batches


def time_art_training(weights, x, y, *, eps, steps, step_size, batch_size, batches) -> float:
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import TensorFlowV2Classifier

    model = fresh_model(weights)
    opt = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def train_step(m, images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, m(images, training=True))
        grads = tape.gradient(loss, m.trainable_variables)
        opt.apply_gradients(zip(grads, m.trainable_variables, strict=True))

    clf = TensorFlowV2Classifier(
        model=model,
        nb_classes=10,
        input_shape=(28, 28, 1),
        loss_object=loss_fn,
        optimizer=opt,
        train_step=train_step,
        clip_values=(0.0, 1.0),
    )

    def trainer():
        return AdversarialTrainerMadryPGD(
            clf,
            nb_epochs=1,
            batch_size=batch_size,
            eps=eps,
            eps_step=step_size,
            max_iter=steps,
            num_random_init=1,
        )

    trainer().fit(x[:batch_size], y[:batch_size])  # warm-up / trace
    n = batches * batch_size
    t = time.perf_counter()
    trainer().fit(x[batch_size : batch_size + n], y[batch_size : batch_size + n])
    return (time.perf_counter() - t) / batches


def time_pgd40(weights, x, y, *, eps, step_size, batch_size) -> tuple[float, float, float, float]:
    model = fresh_model(weights)
    pgd_attack(
        model,
        x[:batch_size],
        y[:batch_size],
        eps=eps,
        steps=2,
        step_size=step_size,
        batch_size=batch_size,
    )
    t = time.perf_counter()
    ours = pgd_attack(model, x, y, eps=eps, steps=40, step_size=step_size, batch_size=batch_size)
    t_ours = time.perf_counter() - t
    attack = make_attack(
        "pgd",
        make_classifier(model),
        eps=eps,
        steps=40,
        step_size=step_size,
        restarts=1,
        batch_size=batch_size,
    )
    make_attack(
        "pgd", make_classifier(model), eps=eps, steps=2, step_size=step_size, batch_size=batch_size
    ).generate(x[:batch_size], y[:batch_size])
    t = time.perf_counter()
    art = attack.generate(x, y)
    t_art = time.perf_counter() - t

    def acc(images):
        return float(
            (np.asarray(model.predict(images, batch_size=1000, verbose=0)).argmax(1) == y).mean()
        )

    return t_ours, t_art, acc(ours), acc(art)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", type=int, default=5, help="timed training batches per side")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="PGD steps of the training attack")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--step-size", type=float, default=0.01)
    p.add_argument(
        "--n-attack", type=int, default=1000, help="test images for the PGD-40 comparison"
    )
    p.add_argument("--attack-batch-size", type=int, default=500)
    p.add_argument(
        "--pretrain-images", type=int, default=5000, help="clean images to pre-train on (0 = none)"
    )
    args = p.parse_args()

    data = load_mnist(train_size=max(args.pretrain_images, (args.batches + 2) * args.batch_size))
    keras.utils.set_random_seed(0)
    model = build_model("madry_cnn")
    if args.pretrain_images:
        model.compile(
            optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        n = args.pretrain_images
        model.fit(data.train.x[:n], data.train.y[:n], batch_size=128, epochs=1, verbose=0)
    weights = model.get_weights()
    x, y = data.train.x, data.train.y
    kw = dict(
        eps=args.eps,
        steps=args.steps,
        step_size=args.step_size,
        batch_size=args.batch_size,
        batches=args.batches,
    )
    print(
        f"tf {tf.__version__}, keras {keras.__version__}, threads {os.cpu_count()}, "
        f"madry_cnn, eps {args.eps}, PGD-{args.steps} step {args.step_size}, batch {args.batch_size}, "
        f"{args.batches} timed batches per side",
        flush=True,
    )

    ours = time_robustlab_training(weights, x, y, **kw)
    print(
        f"(a) robustlab train step: {ours:.3f} s/batch -> {ours * EPOCH_IMAGES / args.batch_size:.0f} s/epoch",
        flush=True,
    )
    art = time_art_training(weights, x, y, **kw)
    print(
        f"(a) ART AdversarialTrainerMadryPGD: {art:.3f} s/batch -> "
        f"{art * EPOCH_IMAGES / args.batch_size:.0f} s/epoch",
        flush=True,
    )
    print(f"(a) speed-up robustlab / ART: {art / ours:.2f}x (target >= 4x)", flush=True)

    test = data.test
    xt, yt = test.x[: args.n_attack], test.y[: args.n_attack]
    t_ours, t_art, a_ours, a_art = time_pgd40(
        weights, xt, yt, eps=args.eps, step_size=args.step_size, batch_size=args.attack_batch_size
    )
    n = len(yt)
    print(
        f"(b) PGD-40 on {n} test images: robustlab {t_ours:.1f} s ({n / t_ours:.0f} img/s, robust acc {a_ours:.3f}), "
        f"ART {t_art:.1f} s ({n / t_art:.0f} img/s, robust acc {a_art:.3f}); speed-up {t_art / t_ours:.2f}x"
    )


if __name__ == "__main__":
    main()
