"""bf16 training, fp32 judging: precision resolution, model copies, the bf16 attack, and a bf16
run that is interrupted, resumed and logged (its model reloads and serves in float32)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from robustlab import precision as prec
from robustlab.precision import BF16, FLOAT32


@functools.cache
def _mnist():
    from robustlab.data.mnist import load_mnist

    return load_mnist(train_size=512)


def _policies(model) -> list[str]:
    return [layer.dtype_policy.name for layer in model.layers]


def test_auto_resolves_by_cpu_flags_and_bad_values_are_refused(tmp_path, monkeypatch):
    with_bf16, without = tmp_path / "cpuinfo_bf16", tmp_path / "cpuinfo_avx512"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert prec.cpu_has_bf16(str(with_bf16))
    assert not prec.cpu_has_bf16(str(without))
    assert not prec.cpu_has_bf16(str(tmp_path / "missing"))

    monkeypatch.setattr(prec, "cpu_has_bf16", lambda: False)
    assert prec.resolve_precision("auto") == FLOAT32
    assert prec.resolve_precision(BF16) == BF16  # explicit bf16 works anywhere (emulated)
    monkeypatch.setattr(prec, "cpu_has_bf16", lambda: True)
    assert prec.resolve_precision("auto") == BF16
    assert prec.resolve_precision(FLOAT32) == FLOAT32

    from robustlab.config import TrainConfig, TuneConfig
    from robustlab.errors import ConfigError

    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig(precision="float16").validate(check_model=False)
    with pytest.raises(ConfigError, match="precision must be one of"):
        TuneConfig(precision="bf16").validate()


def test_bf16_build_and_copies_keep_logits_float32_and_restore_the_global_policy():
    import keras

    from robustlab.models import build_model

    before = keras.mixed_precision.global_policy().name
    keras.utils.set_random_seed(0)
    bf16 = build_model("madry_cnn", BF16)
    assert keras.mixed_precision.global_policy().name == before == FLOAT32
    assert _policies(bf16)[:-1] == [BF16] * (len(bf16.layers) - 1)
    assert _policies(bf16)[-1] == FLOAT32  # the logits layer
    x = _mnist().test.x[:64]
    low = np.asarray(bf16(x))
    assert low.dtype == np.float32

    judged = prec.float32_copy(bf16)
    assert set(_policies(judged)) == {FLOAT32}
    assert all(w.dtype == np.float32 for w in judged.get_weights())
    for a, b in zip(judged.get_weights(), bf16.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    full = np.asarray(judged(x))
    assert not np.array_equal(full, low)  # bf16 really computed in bf16 ...
    np.testing.assert_allclose(full, low, atol=0.05 * np.abs(full).max())  # ... approximately

    again = prec.with_precision(judged, BF16)  # e.g. a float32 init_model trained on in bf16
    assert _policies(again) == _policies(bf16)
    np.testing.assert_array_equal(np.asarray(again(x)), low)

    with pytest.raises(RuntimeError), prec.precision_scope(BF16):
        raise RuntimeError("inside")
    assert keras.mixed_precision.global_policy().name == before


def test_attack_through_a_bf16_model_is_float32_in_ball_and_box():
    import tensorflow as tf

    from robustlab.attacks import make_perturb_fn
    from robustlab.config import AttackConfig
    from robustlab.models import build_model

    test = _mnist().test
    x, y = test.x[:32], test.y[:32].astype(np.int64)
    model = build_model("madry_cnn", BF16)
    perturb = make_perturb_fn(AttackConfig(eps=0.3, steps=3, step_size=0.1))
    x_adv = tf.function(perturb)(model, tf.constant(x), tf.constant(y)).numpy()
    assert x_adv.dtype == np.float32
    assert np.abs(x_adv - x).max() <= 0.3 + 1e-6 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(x_adv - x).max() > 0.2  # it moved (signed steps of 0.1)


@pytest.mark.slow
def test_bf16_run_resumes_in_bf16_and_logs_a_float32_model_with_the_same_logits(
    tracking, monkeypatch
):
    """Interrupted after its first epoch's checkpoint, resumed with precision=auto on a machine
    (pretended) without bf16: it continues in bf16; the logged model is the float32 judging copy
    and gives exactly its logits when reloaded (Keras and pyfunc)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from robustlab.config import AttackConfig, DataConfig, EvalConfig, RunConfig, TrainConfig
    from robustlab.regimes import make_regime
    from robustlab.train.runner import Extras, Judging, Watch, run_training

    seen: list[str] = []  # the training model's precision, per validation (= per epoch)

    class Interrupted(Exception):
        pass

    def validator(model) -> dict[str, float]:
        seen.append(prec.model_precision(model))
        if len(seen) == 2 and interrupt:  # epoch 2 ends after epoch 1's checkpoint
            raise Interrupted
        return {}

    judged: list = []

    def on_trained(model) -> dict[str, float]:
        judged.append(model)
        return {}

    def config(precision: str, resume: str | None = None) -> RunConfig:
        return RunConfig(
            data=DataConfig(None, 512, 200),
            train=TrainConfig(
                epochs=2, seed=0, patience=0, precision=precision, resume_run_id=resume
            ),
            attack=AttackConfig(eps=0.3, steps=2, step_size=0.375),
        ).validate()

    regime = make_regime("perturbation", epochs=2)
    extras = Extras(
        watch=Watch(validators=(validator,)),
        judge=Judging(robust_eval=False, on_trained=on_trained),
    )
    interrupt = True
    with pytest.raises(Interrupted):
        run_training(regime, config(BF16), EvalConfig(), extras)
    client = MlflowClient()
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["precision"] == BF16 and run.info.status == "FAILED"

    interrupt = False
    monkeypatch.setattr(prec, "cpu_has_bf16", lambda: False)  # auto would now mean float32
    run_id = run_training(regime, config("auto", run.info.run_id), EvalConfig(), extras)
    assert run_id == run.info.run_id
    assert seen == [BF16, BF16, BF16]  # epoch 1, interrupted epoch 2, resumed epoch 2
    assert client.get_run(run_id).data.params["precision"] == BF16

    [copy] = judged
    assert set(_policies(copy)) == {FLOAT32}
    x = _mnist().test.x[:256]
    expected = np.asarray(copy.predict(x, batch_size=256, verbose=0))
    reloaded = mlflow.keras.load_model(f"runs:/{run_id}/model")
    assert set(_policies(reloaded)) == {FLOAT32}
    np.testing.assert_array_equal(
        np.asarray(reloaded.predict(x, batch_size=256, verbose=0)), expected
    )
    served = np.asarray(mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(x))
    assert served.dtype == np.float32
    # pyfunc runs keras' predict (batches of 32): oneDNN's blocking differs per batch size
    np.testing.assert_array_equal(served, copy.predict(x, batch_size=32, verbose=0))
    assert np.mean(expected.argmax(1) == _mnist().test.y[:256]) > 0.2  # it learned (chance 0.1)
