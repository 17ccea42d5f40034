"""Run a regime end to end: data, phases through the one loop, evaluation, MLflow logging."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np

from robustlab.config import EvalConfig, RunConfig
from robustlab.credentials import redact_url
from robustlab.data.invariance import InvarianceSet
from robustlab.data.leakage import excluded_test_indices
from robustlab.data.mnist import Mnist, load_mnist, subsample
from robustlab.data.pools import TRAIN_POOL_SETS, InvPools, Pool, load_eval_sets, load_inv_pools
from robustlab.errors import DataError, RobustlabError, TrackingError
from robustlab.evaluation.indices import log_evaluated_indices, take_test_indices
from robustlab.evaluation.plots import image_grid
from robustlab.evaluation.stats import accuracy, predict_logits
from robustlab.evaluation.validation import (
    VAL_ATTACK_SIZE,
    Validator,
    clean_validation,
    inv_accuracy,
    inv_validation,
    log_inv_predictions,
    pgd_validation,
)
from robustlab.models import build_model
from robustlab.precision import (
    AUTO,
    BF16,
    FLOAT32,
    float32_copy,
    model_precision,
    resolve_precision,
    with_precision,
)
from robustlab.provenance import (
    UNKNOWN_TAG,
    Provenance,
    log_excluded_sources,
    metadata_for_run,
    require_provenance,
)
from robustlab.quiet import quiet_keras
from robustlab.regimes import Phase, Regime
from robustlab.seeding import seed_everything
from robustlab.tracking import (
    load_keras_model,
    local_checkpoint_dir,
    start_run,
)
from robustlab.train.checkpoint import (
    CHECKPOINT_ARTIFACT,
    LoopState,
    load_checkpoint,
    log_checkpoint,
    newest_intact,
)
from robustlab.train.curves import log_validation_curves
from robustlab.train.loop import EpochHook, Monitor, fit
from robustlab.train.methods import make_method
from robustlab.train.mixture import Mixture
from robustlab.train.optim import make_optimizer
from robustlab.train.resume import check_resume

EVALUATED_ARTIFACT = (
    "evaluated_test_indices.json"  # the MNIST test images the final evaluation used
)


@dataclass(frozen=True)
class InvData:
    """Which invariance examples a run trains, validates and predicts on."""

    label_source: str = "human"  # the label an invariance example trains with
    pool: tuple[str, ...] = TRAIN_POOL_SETS  # set names or label-store files (*.json)
    # the training/validation pools to use instead of loading `pool` (the experiment's folds)
    pools: InvPools | None = None
    # examples whose predictions are logged per example (`inv_predictions.csv`): the held-out
    # fold of a cross-validated experiment
    predict_sets: tuple[InvarianceSet, ...] = ()


@dataclass(frozen=True)
class Placement:
    """Where the run goes in MLflow."""

    run_name: str | None = None
    nested: bool = False  # a child run of the active run
    tags: dict[str, str] | None = None
    parent_run_id: str | None = None  # a child of a run of another process (tune, experiment)
    experiment_id: str | None = None


@dataclass(frozen=True)
class Watch:
    """What is measured every epoch, and who hears of it."""

    # val/pgd_acc and val/inv_acc for every regime (default: only the ones it trains on);
    # loading the invariance validation pool also excludes its sources from evaluation
    all_curves: bool | None = None
    inv_curve: bool = True  # with all_curves: val/inv_acc too (False: the curve needs no pool)
    validators: tuple[Validator, ...] = ()  # extra per-epoch validators (tune's selection set)
    on_epoch: EpochHook | None = None  # after each epoch's logging (trial.report)
    val_attack_size: int = VAL_ATTACK_SIZE


@dataclass(frozen=True)
class Judging:
    """How the trained model is judged, and on which test images it may never be."""

    robust_eval: bool = True  # full robustness evaluation at the end (PGD, AutoAttack, ...)
    # MNIST test indices to evaluate on instead of a subset of eval_size (the experiment's shared
    # set); refused when it holds one of the model's excluded sources
    test_indices: tuple[int, ...] | None = None
    excluded: tuple[int, ...] = ()  # extra excluded MNIST test sources (a selection set's)
    on_trained: Callable[[keras.Model], dict[str, float]] | None = None  # final metrics, logged
    allow_unknown_provenance: bool = False  # accept an init_model whose exclusions are unknown


@dataclass(frozen=True)
class Extras:
    """A run's options beyond RunConfig, by purpose."""

    inv: InvData = InvData()
    run: Placement = Placement()
    watch: Watch = Watch()
    judge: Judging = Judging()


def _monitor(phase: Phase, has_inv_val: bool) -> Monitor:
    if phase.mix.ptb > 0:
        return Monitor("val/pgd_acc", "max")
    if phase.mix.inv > 0 and has_inv_val:
        return Monitor("val/inv_acc", "max")
    return Monitor("val/loss", "min")


def resume_checkpoint_folder(resume_run_id: str) -> Path:
    """The checkpoint to resume `resume_run_id` from: the local copy under
    tracking/checkpoints/<run_id>/ when it holds an intact checkpoint, else the run's artifacts
    (checked to hold an intact one, so a hopeless resume is refused before any run is touched)."""
    local = local_checkpoint_dir(resume_run_id)
    try:
        newest_intact(local)
    except RobustlabError:
        pass
    else:
        print(f"resuming {resume_run_id} from the local checkpoint {local}", file=sys.stderr)
        return local
    if not mlflow.tracking.MlflowClient().list_artifacts(resume_run_id, CHECKPOINT_ARTIFACT):
        raise RobustlabError(
            f"resume_run_id={resume_run_id}: no checkpoint in that run (it stopped before its "
            "first epoch ended); start a fresh run instead"
        )
    try:
        folder = Path(
            mlflow.artifacts.download_artifacts(
                run_id=resume_run_id, artifact_path=CHECKPOINT_ARTIFACT
            )
        )
    except Exception as exc:  # noqa: BLE001
        raise RobustlabError(
            f"resume_run_id={resume_run_id}: no checkpoint found in that run ({type(exc).__name__})"
        ) from None
    newest_intact(folder)  # none intact: one line before a run exists
    print(f"resuming {resume_run_id} from the checkpoint in its artifacts", file=sys.stderr)
    return folder


def _restore(
    folder: Path, model: keras.Model, cfg: RunConfig
) -> tuple[LoopState, keras.optimizers.Optimizer, list | None]:
    optimizer = make_optimizer(cfg.train)
    state, best = load_checkpoint(folder, model, optimizer)
    return state, optimizer, best


def training_precision(cfg: RunConfig) -> str:
    """The resolved training precision; `auto` on a resumed run keeps the precision it ran in."""
    if cfg.train.precision == AUTO and cfg.train.resume_run_id:
        try:
            old = mlflow.tracking.MlflowClient().get_run(cfg.train.resume_run_id)
        except Exception:  # noqa: BLE001 - check_resume reports a missing run in one line
            old = None
        logged = old.data.params.get("precision") if old is not None else None
        if logged in (FLOAT32, BF16):
            return logged
    return resolve_precision(cfg.train.precision)


def _training_model(cfg: RunConfig, init_model: keras.Model | None, precision: str) -> keras.Model:
    """A fresh model (or `init_model`'s copy) in the training precision, logits float32."""
    if init_model is None:
        return build_model(cfg.train.model, precision)
    if model_precision(init_model) == precision:
        return init_model
    return with_precision(init_model, precision)


def _tracking_server_down() -> bool:
    """True when the tracking URI is an HTTP server that does not answer /health now."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return False
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
            return resp.status != 200
    except OSError:
        return True


def lost_server_error(run_id: str, exc: BaseException) -> TrackingError:
    """The one-line error for a tracking server that went away mid-run and did not come back."""
    folder = local_checkpoint_dir(run_id)
    if (folder / "state.json").is_file():
        kept = (
            f"the last epoch checkpoint is kept in {folder}; once the server is back, "
            f"resume with --resume-run-id {run_id}"
        )
    else:
        kept = "no epoch had finished, so there is no checkpoint; start a fresh run"
    return TrackingError(
        f"lost the tracking server {redact_url(mlflow.get_tracking_uri())} during run {run_id} (still down "
        f"after MLflow's retries, {type(exc).__name__}); {kept}"
    )


class _Guard:
    run_id: str | None = None


@contextmanager
def _lost_server_guard() -> Iterator[_Guard]:
    """Turn a failure inside a run whose HTTP tracking server is gone into `lost_server_error`."""
    guard = _Guard()
    try:
        yield guard
    except Exception as exc:
        if guard.run_id is not None and _tracking_server_down():
            raise lost_server_error(guard.run_id, exc) from None
        raise


def _log_datasets(mnist: Mnist, pools: InvPools | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for split, context in (
            (mnist.train, "training"),
            (mnist.val, "validation"),
            (mnist.test, "evaluation"),
        ):
            ds = mlflow.data.from_numpy(
                split.x, targets=split.y, source=str(mnist.path), name=f"mnist-{context}"
            )
            _log_input(ds, context)
        if pools is not None:
            pool = pools.train_pool()
            ds = mlflow.data.from_numpy(pool.x, targets=pool.y, name=f"invariance-{pools.name}")
            _log_input(ds, "training")


def _log_input(dataset, context: str, attempts: int = 3) -> None:
    """`mlflow.log_input`, retried when another process (a parallel run or tuning worker) inserted
    the same dataset into the experiment at the same moment: MLflow's SQL store then fails on its
    unique key, and the retry finds the dataset and only links it to this run."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as exc:
            text = str(exc)
            if attempt == attempts - 1 or not ("UNIQUE" in text or "duplicate key" in text):
                raise


def _final_clean_eval(
    model: keras.Model,
    mnist: Mnist,
    excluded: np.ndarray,
    cfg: RunConfig,
    out: Path,
    test_indices: tuple[int, ...] | None = None,
):
    if test_indices is not None:
        test = take_test_indices(mnist.test, test_indices, excluded)
    else:
        test = subsample(
            mnist.test.without_sources(excluded), cfg.data.eval_size, seed=cfg.train.seed
        )
    pred = np.argmax(predict_logits(model, test.x), axis=1)
    acc = accuracy(pred == test.y)
    mlflow.log_metrics({**acc.as_metrics("test/clean_acc"), "test/n_images": float(acc.n)})
    log_evaluated_indices(test)
    idx = np.arange(min(16, len(test)))
    image_grid(
        [("test", test.x[idx])],
        test.y[idx],
        [pred[idx]],
        out / "test_predictions.png",
        title=f"clean test accuracy {acc.value:.4f} [{acc.ci_low:.4f}, {acc.ci_high:.4f}] on {acc.n} images",
    )
    mlflow.log_artifact(str(out / "test_predictions.png"), "plots")
    print(
        f"test/clean_acc = {acc.value:.4f}  95% CI [{acc.ci_low:.4f}, {acc.ci_high:.4f}]  (n={acc.n})",
        file=sys.stderr,
    )
    return test


@dataclass
class Prepared:
    """Everything `run_training` knows and has checked before its MLflow run exists."""

    regime: Regime
    cfg: RunConfig
    eval_cfg: EvalConfig
    extras: Extras
    mnist: Mnist
    pools: InvPools | None
    init_model: keras.Model | None
    init_prov: Provenance | None
    excluded: np.ndarray  # MNIST test sources the model is never evaluated on
    eval_sets: dict[str, InvarianceSet]
    precision: str
    params: dict[str, object]
    tags: dict[str, str]
    ckpt_folder: Path | None  # the checkpoint a resumed run continues from
    same_run: bool  # the resumed run is reopened (CLI) rather than a new run (mlflow run, nested)


def prepare(regime: Regime, cfg: RunConfig, eval_cfg: EvalConfig, extras: Extras) -> Prepared:
    """Load and check data, pools, the initial model's provenance, the exclusions, the resume
    checkpoint and the run's params and tags; one-line errors before any run exists."""
    cfg.validate()
    eval_cfg.validate()
    mnist = load_mnist(cfg.data.data_dir, train_size=cfg.data.train_size)
    all_curves = bool(extras.watch.all_curves)
    pools = extras.inv.pools
    if pools is None and (regime.uses_inv or (all_curves and extras.watch.inv_curve)):
        pools = load_inv_pools(cfg.data.data_dir, extras.inv.label_source, extras.inv.pool)
    init_model = init_prov = None
    excluded = np.asarray(extras.judge.excluded, dtype=np.int64)
    if cfg.train.init_model:
        init_model = load_keras_model(cfg.train.init_model)
        init_prov = require_provenance(
            cfg.train.init_model,
            extras.judge.allow_unknown_provenance,
            "--allow-unknown-provenance",
        )
        excluded = np.union1d(excluded, init_prov.excluded)
    excluded = np.union1d(excluded, excluded_test_indices(pools.used_sets if pools else []))
    if extras.judge.test_indices is not None:  # fail closed before the run exists
        take_test_indices(mnist.test, extras.judge.test_indices, excluded)
    try:
        eval_sets = load_eval_sets(cfg.data.data_dir, excluded)
    except DataError as exc:
        eval_sets = {}
        print(
            f"note: invariance evaluation sets unavailable ({exc}); skipping test/inv_acc",
            file=sys.stderr,
        )
    precision = training_precision(cfg)
    params = {
        "regime": regime.name,
        **cfg.flat_params(),
        "precision": precision,  # resolved: float32 or mixed_bfloat16
        "inv_label_source": extras.inv.label_source,
        "inv_pool": (pools.name if extras.inv.pools else ",".join(extras.inv.pool))
        if pools
        else "",
        "phases": ",".join(f"{p.name}:{p.epochs}" for p in regime.phases),
    }
    tags = {
        "robustlab.regime": regime.name,
        "robustlab.mnist_digest": mnist.digest,
        **(extras.run.tags or {}),
        **({UNKNOWN_TAG: "unknown-allowed"} if init_prov and not init_prov.known else {}),
    }
    resume_id, ckpt_folder = cfg.train.resume_run_id, None
    if resume_id:
        check_resume(resume_id, regime.name, params, mnist.digest)
        ckpt_folder = resume_checkpoint_folder(resume_id)
    # through the CLI a resumed run continues itself; under `mlflow run` (or nested) MLflow has
    # already created a new run, which records where it resumed from
    same_run = (
        bool(resume_id)
        and not extras.run.nested
        and not extras.run.parent_run_id
        and not os.environ.get("MLFLOW_RUN_ID")
    )
    return Prepared(
        regime,
        cfg,
        eval_cfg,
        extras,
        mnist,
        pools,
        init_model,
        init_prov,
        excluded,
        eval_sets,
        precision,
        params,
        tags,
        ckpt_folder,
        same_run,
    )


def run_training(
    regime: Regime, cfg: RunConfig, eval_cfg: EvalConfig, extras: Extras = Extras()
) -> str:
    """Train `regime` under `cfg` in one MLflow run (nested runs per phase); return the run id.

    Three steps: `prepare` (every check, before the run exists), `train_phases` (the phases
    through the one loop, checkpointed per epoch) and `judge_and_log` (a float32 copy of the
    trained weights is evaluated and logged as the run's model)."""
    p = prepare(regime, cfg, eval_cfg, extras)
    resume_id = cfg.train.resume_run_id
    run_ctx = start_run(
        extras.run.run_name or regime.name,
        params=p.params,
        tags=p.tags,
        nested=extras.run.nested,
        system_metrics=not (extras.run.nested or extras.run.parent_run_id),
        parent_run_id=extras.run.parent_run_id,
        experiment_id=extras.run.experiment_id,
        run_id=resume_id if p.same_run else None,
    )
    with _lost_server_guard() as guard, run_ctx as run, tempfile.TemporaryDirectory() as tmp:
        run_id = guard.run_id = run.info.run_id
        if not p.same_run:  # a reopened run logged its datasets and excluded sources already
            _log_datasets(p.mnist, p.pools)
            log_excluded_sources(p.excluded)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        model = _training_model(cfg, p.init_model, p.precision)
        print(f"training precision: {p.precision}", file=sys.stderr)
        resumed: tuple | None = _restore(p.ckpt_folder, model, cfg) if p.ckpt_folder else None
        if resumed and not p.same_run:
            mlflow.set_tag("robustlab.resumed_from", resume_id)
        if resumed:
            mlflow.set_tag("robustlab.resumed_after_epoch", str(resumed[0].global_epoch))
        train_phases(p, model, resumed, run_id)
        judge_and_log(p, model, run_id, Path(tmp))
    shutil.rmtree(local_checkpoint_dir(run_id), ignore_errors=True)  # the run has the model
    if resume_id:
        shutil.rmtree(local_checkpoint_dir(resume_id), ignore_errors=True)
    return run_id


def _validators(p: Prepared) -> list[Validator]:
    """Every epoch's validators: clean, PGD-10 (regimes that attack, or all curves), the
    invariance validation pool, and the caller's."""
    mnist, extras = p.mnist, p.extras
    out: list[Validator] = [clean_validation(mnist.val)]
    if p.regime.uses_ptb or extras.watch.all_curves:
        val_small = subsample(mnist.val, extras.watch.val_attack_size, seed=0)
        out.append(pgd_validation(val_small.x, val_small.y, p.cfg.attack.eps))
    if p.pools is not None:
        out.append(inv_validation(p.pools))
    return out + list(extras.watch.validators)


def _phase_run(regime: Regime, phase: Phase):
    """A nested run per phase for multi-phase regimes, else nothing."""
    if not regime.nested:
        return nullcontext()
    params = {
        "phase": phase.name,
        "epochs": phase.epochs,
        **{f"mix_{k}": v for k, v in vars(phase.mix).items()},
    }
    return start_run(phase.name, nested=True, system_metrics=False, params=params)


def train_phases(p: Prepared, model: keras.Model, resumed: tuple | None, run_id: str) -> None:
    """The regime's phases through the one loop (`fit`), from `resumed` when given."""
    cfg, regime, extras = p.cfg, p.regime, p.extras
    global_epoch = resumed[0].global_epoch if resumed else -1
    mnist_pool = Pool(p.mnist.train.x, p.mnist.train.y, "mnist-train")
    method = make_method(cfg.attack) if regime.uses_ptb else None
    validators = _validators(p)
    for i, phase in enumerate(regime.phases):
        state = optimizer = best = None
        if resumed and resumed[0].phase_index > i:
            continue
        if resumed and resumed[0].phase_index == i:
            state, optimizer, best = resumed
        state = state or LoopState(phase_index=i, global_epoch=global_epoch)
        optimizer = optimizer or make_optimizer(cfg.train)
        inv_pool = p.pools.train_pool() if p.pools else None
        mixture = Mixture(mnist_pool, phase.mix, cfg.train.batch_size, inv_pool)
        with _phase_run(regime, phase) as phase_run:

            def on_epoch(metrics: dict[str, float], step: int, _phase_run=phase_run) -> None:
                mlflow.log_metrics(metrics, step=step, run_id=run_id)
                if _phase_run is not None:
                    mlflow.log_metrics(metrics, step=step, run_id=_phase_run.info.run_id)
                log_validation_curves(run_id)
                if extras.watch.on_epoch is not None:
                    extras.watch.on_epoch(metrics, step)

            result = fit(
                model,
                optimizer,
                mixture,
                cfg.train,
                phase.epochs,
                validators=validators,
                method=method,
                monitor=_monitor(phase, p.pools is not None),
                state=state,
                best_weights=best,
                checkpoint_dir=local_checkpoint_dir(run_id),
                on_epoch=on_epoch,
                on_checkpoint=lambda folder: log_checkpoint(folder, run_id),
                phase=phase.name,
                eps_warmup=cfg.attack.eps_warmup,
            )
            global_epoch = state.global_epoch
            summary = {
                f"{phase.name}/epochs_run": result.phase_epochs,
                f"{phase.name}/best_epoch": result.best_epoch,
                f"{phase.name}/train_seconds": result.seconds,
            }
            mlflow.log_metrics(summary, run_id=run_id)


def judge_and_log(p: Prepared, model: keras.Model, run_id: str, out: Path) -> None:
    """fp32 judging: whatever the training precision, everything here (selection metrics,
    evaluation, invariance predictions, the logged model) sees only a float32 copy of the
    trained weights."""
    extras = p.extras
    judged = float32_copy(model)
    if extras.judge.on_trained is not None:
        mlflow.log_metrics(extras.judge.on_trained(judged))
    test = _final_clean_eval(judged, p.mnist, p.excluded, p.cfg, out, extras.judge.test_indices)
    for s in p.eval_sets.values():
        mlflow.log_metrics(inv_accuracy(judged, s, "test"))
    if extras.inv.predict_sets:
        log_inv_predictions(judged, extras.inv.predict_sets, out)
    if extras.judge.robust_eval:
        from robustlab.evaluation.robustness import evaluate_and_log

        evaluate_and_log(judged, test, p.eval_cfg, out_dir=out / "eval")
    _log_model(
        judged,
        test.x[:4],
        metadata_for_run(
            p.regime,
            p.cfg,
            run_id=run_id,
            data_digest=p.mnist.digest,
            excluded=p.excluded,
            init_known=p.init_prov is None or p.init_prov.known,
            training_precision=p.precision,
        ),
    )


def _log_model(model: keras.Model, example: np.ndarray, metadata: dict | None = None) -> None:
    """Log `model` as the run's MLflow LoggedModel `model` (keras flavour, tensor signature)."""
    import types

    from mlflow.models import Model

    from robustlab.model_folder import model_requirements
    from robustlab.model_folder import signature as model_signature

    signature = model_signature()

    def save_model(path: str, **kwargs) -> None:
        # mlflow 3.17's keras flavour writes the input example before it creates the model folder
        # (log_model(input_example=...) fails); create the folder first, change nothing else.
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)

    keras_flavour = types.SimpleNamespace(__name__="mlflow.keras", save_model=save_model)
    # MLflow checks the input example with Keras' predict (a progress bar): quiet unless verbose
    with warnings.catch_warnings(), quiet_keras():
        warnings.simplefilter("ignore")
        # exactly what mlflow.keras.log_model does (Model.log with the keras flavour module)
        Model.log(
            None,
            name="model",
            flavor=keras_flavour,
            model=model,
            signature=signature,
            input_example=example.astype(np.float32),
            pip_requirements=model_requirements(),
            metadata=metadata,
        )
