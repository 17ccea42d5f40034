"""The training loop on a real MNIST slice: learning, early stopping, checkpoint and resume."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from robustlab.config import MixConfig, TrainConfig
from robustlab.data.mnist import load_mnist
from robustlab.evaluation.validation import clean_validation
from robustlab.models import build_model
from robustlab.train.checkpoint import load_checkpoint
from robustlab.train.loop import Monitor, fit
from robustlab.train.mixture import Mixture, Pool
from tests.conftest import DATA_DIR


@pytest.fixture(scope="module")
def data():
    m = load_mnist(DATA_DIR, train_size=3000)
    return Pool(m.train.x, m.train.y, "mnist"), m.val.take(np.arange(1000))


def _fit(pool, val, epochs, tmp_path, state=None, model=None, optimizer=None, best=None, **cfg):
    keras.utils.set_random_seed(0)
    model = model or build_model("madry_cnn")
    optimizer = optimizer or keras.optimizers.Adam(1e-3)
    config = TrainConfig(epochs=epochs, batch_size=64, seed=0, **cfg)
    result = fit(
        model,
        optimizer,
        Mixture(pool, MixConfig(), 64),
        config,
        epochs,
        validators=[clean_validation(val)],
        state=state,
        best_weights=best,
        checkpoint_dir=tmp_path / "ckpt",
    )
    return model, optimizer, result


def test_loop_learns_and_checkpoint_restores_exactly(data, tmp_path):
    pool, val = data
    model, optimizer, result = _fit(pool, val, 2, tmp_path)
    assert result.epochs_run == 2 and len(result.history) == 2
    assert (
        result.history[-1]["val/clean_acc"] > 0.85
    )  # far above chance after 2 epochs on 3k images
    assert {"train/loss", "train/acc", "val/loss", "val/clean_acc"} <= set(result.history[0])
    restored, opt2 = build_model("madry_cnn"), keras.optimizers.Adam(1e-3)
    state, best = load_checkpoint(tmp_path / "ckpt", restored, opt2)
    assert state.epoch == 1 and state.done and state.best_epoch == result.best_epoch
    # optimizer state and the last epoch's weights come back exactly
    for a, b in zip(optimizer.variables, opt2.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # best.npz holds the weights the loop returned the model with
    for w, b in zip(model.get_weights(), best, strict=True):
        np.testing.assert_array_equal(w, b)


def test_resume_continues_from_the_next_epoch(data, tmp_path):
    pool, val = data
    _fit(pool, val, 1, tmp_path)  # an "interrupted" run: 1 epoch done of 3
    model, opt = build_model("madry_cnn"), keras.optimizers.Adam(1e-3)
    state, best = load_checkpoint(tmp_path / "ckpt", model, opt)
    state.done = False
    _, _, result = _fit(pool, val, 3, tmp_path, state=state, model=model, optimizer=opt, best=best)
    assert result.epochs_run == 2  # epochs 2 and 3 only
    assert (
        load_checkpoint(tmp_path / "ckpt", build_model("madry_cnn"), keras.optimizers.Adam())[
            0
        ].epoch
        == 2
    )


def test_early_stopping_keeps_the_best_weights(data, tmp_path):
    pool, val = data
    model = build_model("madry_cnn")
    optimizer = keras.optimizers.Adam(1e-3)
    calls = iter([0.5, 0.4, 0.45, 0.47, 0.3])  # val metric: best at epoch 2, then 2 worse epochs

    def fake_val(_model):
        return {"val/loss": next(calls)}

    snapshots = []

    def on_epoch(metrics, step):
        snapshots.append([np.array(w) for w in model.get_weights()])

    result = fit(
        model,
        optimizer,
        Mixture(pool, MixConfig(), 256),
        TrainConfig(epochs=5, batch_size=256, patience=2),
        5,
        validators=[fake_val],
        monitor=Monitor("val/loss", "min"),
        on_epoch=on_epoch,
    )
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 1
    for w, best in zip(model.get_weights(), snapshots[1], strict=True):
        np.testing.assert_array_equal(w, best)


def test_resume_skips_a_checkpoint_slot_truncated_by_a_crash(data, tmp_path):
    import shutil

    from robustlab.errors import RobustlabError
    from robustlab.train.checkpoint import LoopState, save_checkpoint

    pool, val = data
    model, opt, _ = _fit(pool, val, 1, tmp_path)
    logged = tmp_path / "logged"  # the run's checkpoint/ artifact folder, two slots
    shutil.copytree(tmp_path / "ckpt", logged / "slot0")
    save_checkpoint(logged / "slot1", model, opt, None, LoopState(epoch=1, global_epoch=1))

    def epoch_of() -> int:
        model = build_model("madry_cnn")
        return load_checkpoint(logged, model, keras.optimizers.Adam())[0].epoch

    assert epoch_of() == 1  # the newest intact slot
    weights = logged / "slot1" / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # killed mid-copy
    assert epoch_of() == 0  # falls back to the older, intact slot
    weights = logged / "slot0" / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RobustlabError, match="no intact checkpoint"):
        epoch_of()


def test_step_lr_schedule_drops_the_rate_late_in_the_phase(data, tmp_path):
    pool, val = data
    small = Pool(pool.x[:128], pool.y[:128], "mnist-128")
    seen: list[float] = []
    keras.utils.set_random_seed(0)
    model, optimizer = build_model("madry_cnn"), keras.optimizers.Adam(1e-3)
    cfg = TrainConfig(epochs=10, batch_size=64, seed=0, patience=0, lr_schedule="step")

    def record(metrics, step):
        seen.append(float(np.asarray(optimizer.learning_rate)))

    fit(model, optimizer, Mixture(small, MixConfig(), 64), cfg, 10, validators=[], on_epoch=record)
    np.testing.assert_allclose(seen, [1e-3] * 8 + [1e-4, 1e-5], rtol=1e-6)
    constant = keras.optimizers.Adam(2e-3)
    fit(
        build_model("madry_cnn"),
        constant,
        Mixture(small, MixConfig(), 64),
        TrainConfig(epochs=3, batch_size=64, patience=0),
        3,
        validators=[],
    )
    assert float(np.asarray(constant.learning_rate)) == pytest.approx(2e-3)
