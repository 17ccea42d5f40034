"""All run configuration in one typed place. Each `validate()` raises a one-line ConfigError."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from robustlab.errors import ConfigError
from robustlab.precision import check_precision

AttackMethod = Literal["pgd", "fgsm_rs", "trades"]
METHODS: tuple[str, ...] = ("pgd", "fgsm_rs", "trades")
PGD_STEP_FACTOR = 2.5  # PGD's step size: 2.5 * eps / steps (Madry et al.)
FGSM_RS_STEP_FACTOR = 1.25  # FGSM-RS's one step: 1.25 * eps (Wong et al. 2020)
MAX_SEED = 2**32 - 1  # NumPy and TensorFlow seeds are unsigned 32-bit


def check_finite(**values: float) -> None:
    """ConfigError naming the first value that is NaN or infinite."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")


def pgd_step_size(eps: float, steps: int) -> float:
    """PGD's step size, 2.5 * eps / steps (0.01 for eps 0, where it does not matter)."""
    return PGD_STEP_FACTOR * eps / steps if eps > 0 else 0.01


def default_step_size(method: str, eps: float, steps: int) -> float:
    """A training method's default step: FGSM-RS 1.25 * eps, PGD and TRADES 2.5 * eps / steps."""
    if method == "fgsm_rs":
        return FGSM_RS_STEP_FACTOR * eps
    return pgd_step_size(eps, max(steps, 1))


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = None  # None: $ROBUSTLAB_DATA_DIR, then the Keras cache / download
    train_size: int = 0  # 0 = all 55,000 training images
    eval_size: int = 0  # 0 = the whole test set (minus excluded sources)

    def validate(self) -> None:
        if self.train_size < 0:
            raise ConfigError(f"train_size must be >= 0 (0 = all), got {self.train_size}")
        if self.eval_size < 0:
            raise ConfigError(f"eval_size must be >= 0 (0 = whole test set), got {self.eval_size}")


@dataclass(frozen=True)
class AttackConfig:
    """An L-inf attack used during training (and its PGD twin for validation)."""

    eps: float = 0.3
    steps: int = 40
    step_size: float = 0.01
    random_start: bool = True
    method: AttackMethod = "pgd"
    eps_warmup: float = 0.0  # epochs over which eps ramps linearly from 0 to `eps` (0 = none)
    trades_beta: float = 6.0  # TRADES: weight of KL(f(x) || f(x')) beside CE(f(x), y)

    def validate(self) -> None:
        check_finite(
            eps=self.eps,
            step_size=self.step_size,
            eps_warmup=self.eps_warmup,
            trades_beta=self.trades_beta,
        )
        if not (0.0 <= self.eps <= 1.0) or math.isnan(self.eps):
            raise ConfigError(f"eps must lie in [0, 1] (images are in [0, 1]), got {self.eps}")
        if self.steps < 1 and self.method == "trades":
            raise ConfigError(
                f"attack_steps must be >= 1 for method=trades (its inner maximisation takes "
                f"steps), got {self.steps}"
            )
        if self.steps < 1:
            raise ConfigError(f"attack_steps must be >= 1, got {self.steps}")
        if self.trades_beta < 0:
            raise ConfigError(f"trades_beta must be >= 0, got {self.trades_beta}")
        if not self.step_size > 0:
            raise ConfigError(f"step_size must be > 0, got {self.step_size}")
        if self.eps_warmup < 0:
            raise ConfigError(f"eps_warmup must be >= 0 epochs, got {self.eps_warmup}")
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown method {self.method!r}; choose one of {', '.join(map(repr, METHODS))}"
            )


@dataclass(frozen=True)
class MixConfig:
    """Share of each batch drawn from clean MNIST, on-the-fly PGD adversarials, invariance examples."""

    clean: float = 1.0
    ptb: float = 0.0
    inv: float = 0.0

    def validate(self) -> None:
        for name, value in (
            ("mix_clean", self.clean),
            ("mix_ptb", self.ptb),
            ("mix_inv", self.inv),
        ):
            if not (0.0 <= value <= 1.0) or math.isnan(value):
                raise ConfigError(f"{name} must lie in [0, 1], got {value}")
        total = self.clean + self.ptb + self.inv
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"mix_clean + mix_ptb + mix_inv must sum to 1, got {self.clean} + {self.ptb} + {self.inv} = {total:g}"
            )


LR_SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("adam", "sgd")  # sgd: momentum 0.9 (TRADES', Madry's)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate's factor in epoch `epoch` (0-based) of `epochs` under `schedule`:
    constant 1; step 1, then 0.1 from 75% of the epochs, 0.01 from 90%; cosine
    (1 + cos(pi * epoch / epochs)) / 2, from 1 down towards 0 in the last epoch."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    if schedule == "constant" or epoch < 0.75 * epochs:
        return 1.0
    return 0.1 if epoch < 0.9 * epochs else 0.01


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    patience: int = 3  # early stopping: epochs without improvement of the monitored metric
    model: str = "madry_cnn"
    init_model: str | None = None  # model URI to start from (runs:/..., models:/...)
    resume_run_id: str | None = None  # continue from this run's last checkpoint
    deterministic: bool = True  # TensorFlow op determinism (same seed: bitwise-equal runs)
    # training precision: float32 | mixed_bfloat16 | auto (bf16 where the CPU has it natively);
    # evaluation and the logged model are always float32 (robustlab.precision)
    precision: str = "auto"
    # learning rate over each phase's epochs: constant, step (x0.1 from 75% of the epochs,
    # x0.01 from 90%, as in Madry's and TRADES' schedules) or cosine (see `lr_factor`)
    lr_schedule: str = "constant"
    optimizer: str = "adam"  # adam, or sgd (momentum 0.9)

    def validate(self, check_model: bool = True) -> None:
        """`check_model=False` skips the model-name check, which imports Keras."""
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_finite(learning_rate=self.learning_rate)
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must lie in [0, 2**32 - 1], got {self.seed}")
        if self.patience < 0:
            raise ConfigError(f"patience must be >= 0, got {self.patience}")
        check_precision(self.precision)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {list(LR_SCHEDULES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}"
            )
        if not check_model:
            return
        from robustlab.models import available_models

        if self.model not in available_models():
            raise ConfigError(f"unknown model {self.model!r}; choose one of {available_models()}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training entry point needs."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    def validate(self, check_model: bool = True) -> RunConfig:
        """Raise a one-line ConfigError for the first bad value; `check_model=False` skips the
        model-name check (it imports Keras), for checks that must stay fast."""
        for part in (self.data, self.mix, self.attack):
            part.validate()
        self.train.validate(check_model)
        if 0 < self.data.train_size < self.train.batch_size:
            raise ConfigError(
                f"train_size {self.data.train_size} is smaller than one batch "
                f"({self.train.batch_size}); raise train_size or lower batch_size"
            )
        return self

    def flat_params(self) -> dict[str, Any]:
        """MLflow params, named like the MLproject parameters."""
        attack_names = {
            "steps": "attack_steps",
            "step_size": "step_size",
            "eps": "eps",
            "random_start": "random_start",
            "method": "method",
            "eps_warmup": "eps_warmup",
            "trades_beta": "trades_beta",
        }
        out: dict[str, Any] = {}
        for section, values in asdict(self).items():
            for key, value in values.items():
                name = {"mix": f"mix_{key}", "attack": attack_names.get(key, key)}.get(section, key)
                out[name] = value
        return out


PGD_ENGINES = ("robustlab", "art")  # in-graph PGD with early exit, or ART's


@dataclass(frozen=True)
class EvalConfig:
    """The robustness evaluation run at the end of every training run and by `evaluate`."""

    eps: float = 0.3
    eval_size: int = 0  # 0 = whole test set minus excluded sources
    # the PGD chain (and the AutoAttack and eps-curve subsets, drawn from within it) on a seeded
    # subset of this many of the evaluated images (0 = all of them); clean accuracy always uses
    # every evaluated image. The experiment sizes it by the precision its claims need
    pgd_size: int = 0
    autoattack_size: int = 1000  # seeded subset for AutoAttack and Square
    pgd_restarts: int = 5  # random restarts of the PGD-100 attack (0 = PGD-40 only)
    seed: int = 0
    batch_size: int = 500
    # the accuracy-vs-eps curve (PGD-40 on a seeded subset, each eps on the survivors of the
    # smaller one). End-of-training default 500 images x 5 points (0, 0.1, .., 0.4): on a robust
    # model each point costs about 40 gradient steps per robust image, so 500 x 4 attacked
    # points stay under a fifth of the full-test-set PGD-40 stage; `evaluate` and the `full`
    # budget pass 1000 x 9 (0, 0.05, .., 0.4)
    curve_size: int = 500
    curve_points: int = 5
    square_queries: int = 5000  # Square's query budget, inside AutoAttack and alone
    # the stand-alone Square stage beside AutoAttack (whose third attack is Square already): the
    # end of training and the experiment's smoke/default budgets leave it to `evaluate`
    square_alone: bool = True
    # "robustlab": in-graph PGD with early exit (end of training; same attack as ART's, tested);
    # `evaluate` passes "art" by default, the independent cross-check against ART's PGD
    pgd_engine: str = "robustlab"
    pgd_steps: int = 100  # steps of each restart of the restart stage: test/pgd{steps}x{R}_acc
    # the subsets (AutoAttack, eps-curve) are drawn with this seed (None: `seed`); an experiment
    # fixes it, so every regime, seed and fold is judged on the same images
    subset_seed: int | None = None
    # optional stages of the attack registry to run too (robustlab.attacks.registry)
    extra_attacks: tuple[str, ...] = ()
    # False: every PGD runs all its steps and each eps-curve point attacks every clean-correct
    # image (the evaluation cost before issue 11, for bench/bench_eval.py); the flags are the
    # same, except that the curve is then not the worst case over the smaller eps
    early_exit: bool = True

    def validate(self) -> EvalConfig:
        if not (0.0 <= self.eps <= 1.0) or math.isnan(self.eps):
            raise ConfigError(f"eps must lie in [0, 1], got {self.eps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must lie in [0, 2**32 - 1], got {self.seed}")
        for name in ("eval_size", "pgd_size", "autoattack_size", "curve_size"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"{name} must be >= 0 (0 = all / skip), got {getattr(self, name)}"
                )
        if self.square_queries < 1:
            raise ConfigError(f"square_queries must be >= 1, got {self.square_queries}")
        if self.curve_points < 2:
            raise ConfigError(f"curve_points must be >= 2, got {self.curve_points}")
        if self.pgd_restarts < 0:
            raise ConfigError(
                f"pgd_restarts must be >= 0 (0 = PGD-40 only), got {self.pgd_restarts}"
            )
        if self.pgd_steps < 1:
            raise ConfigError(f"pgd_steps must be >= 1, got {self.pgd_steps}")
        if self.pgd_engine not in PGD_ENGINES:
            raise ConfigError(f"pgd_engine must be one of {PGD_ENGINES}, got {self.pgd_engine!r}")
        if self.subset_seed is not None and not 0 <= self.subset_seed <= MAX_SEED:
            raise ConfigError(f"subset_seed must lie in [0, 2**32 - 1], got {self.subset_seed}")
        return self


TUNE_OBJECTIVES = ("pareto", "scalar")
TUNE_SAMPLERS = ("tpe", "nsgaii", "random", "gp")
TUNE_BUDGETS = ("smoke", "default")  # see robustlab.tune.budgets.BUDGETS
TUNE_PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class Heartbeat:
    """A worker beats every `interval` s; a trial silent for `grace_period` s is retried (with
    its parameters) up to `max_retry` times; a leader silent that long is replaced."""

    interval: int = 60
    grace_period: int = 180
    max_retry: int = 2

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Heartbeat:
        """From a stored record: `{"interval", ...}` or the flat `heartbeat_interval`,
        `grace_period`, `max_retry` keys of earlier versions."""
        if isinstance(record.get("heartbeat"), dict):
            return cls(**record["heartbeat"])
        keys = (("interval", "heartbeat_interval"), ("grace_period",) * 2, ("max_retry",) * 2)
        return cls(**{mine: record[theirs] for mine, theirs in keys if theirs in record})

    def validate(self) -> Heartbeat:
        if self.interval < 1 or self.grace_period <= self.interval:
            raise ConfigError(
                "heartbeat_interval must be >= 1 s and grace_period longer than it, got "
                f"{self.interval} and {self.grace_period}"
            )
        if self.max_retry < 0:
            raise ConfigError(f"max_retry must be >= 0, got {self.max_retry}")
        return self


@dataclass(frozen=True)
class TuneConfig:
    """An Optuna study over the joint regime's batch mixture (`robustlab tune`)."""

    objective: str = "pareto"  # pareto: 3 objectives + clean floor; scalar: one score, pruned
    n_trials: int = 20  # COMPLETE trials in the whole study (resumed studies count old ones)
    timeout: float | None = None  # seconds per worker (None = no limit)
    study_name: str | None = None  # None: tune-<objective>-<budget>
    storage: str | None = None  # RDB URL; None: $ROBUSTLAB_OPTUNA_STORAGE, then tracking/optuna.db
    sampler: str = "tpe"
    workers: int = 1  # processes on one study
    budget: str = "default"
    clean_floor: float = 0.9  # validation clean accuracy a trial must reach (constraint)
    seed: int = 0
    tune_lr: bool = False  # also search learning_rate (log-uniform 1e-4..3e-3)
    tune_warmup: bool = False  # also search eps_warmup (0..2 epochs)
    method: str = "pgd"  # the trials' training method for the attacked rows (METHODS)
    trades_beta: float = 6.0  # method=trades: the weight of the KL term, unless searched
    tune_beta: bool = False  # method=trades: also search trades_beta (log-uniform 1..10)
    eps: float = 0.3
    data_dir: str | None = None
    pruner: str = "median"  # scalar mode only
    heartbeat: Heartbeat = field(default_factory=lambda: Heartbeat())
    threads: int = 0  # TensorFlow intra/inter-op threads per worker (0 = TensorFlow's default)
    pin_cpus: bool = False  # pin worker i to CPU core i (taskset), e.g. for scaling benchmarks
    precision: str = (
        "auto"  # trials' training precision (TrainConfig.precision), resolved per worker
    )

    @property
    def name(self) -> str:
        return self.study_name or f"tune-{self.objective}-{self.budget}"

    def validate(self) -> TuneConfig:
        if self.objective not in TUNE_OBJECTIVES:
            raise ConfigError(
                f"unknown objective {self.objective!r}; choose one of {list(TUNE_OBJECTIVES)}"
            )
        if self.sampler not in TUNE_SAMPLERS:
            raise ConfigError(
                f"unknown sampler {self.sampler!r}; choose one of {list(TUNE_SAMPLERS)}"
            )
        if self.budget not in TUNE_BUDGETS:
            raise ConfigError(f"unknown budget {self.budget!r}; choose one of {list(TUNE_BUDGETS)}")
        if self.pruner not in TUNE_PRUNERS:
            raise ConfigError(f"unknown pruner {self.pruner!r}; choose one of {list(TUNE_PRUNERS)}")
        if self.n_trials < 1:
            raise ConfigError(f"n_trials must be >= 1, got {self.n_trials}")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds (empty = no limit), got {self.timeout}")
        if not (0.0 <= self.clean_floor <= 1.0) or math.isnan(self.clean_floor):
            raise ConfigError(f"clean_floor must lie in [0, 1], got {self.clean_floor}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if not (0.0 <= self.eps <= 1.0) or math.isnan(self.eps):
            raise ConfigError(f"eps must lie in [0, 1], got {self.eps}")
        self.heartbeat.validate()
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        check_precision(self.precision)
        AttackConfig(method=self.method, trades_beta=self.trades_beta).validate()
        if self.tune_beta and self.method != "trades":
            raise ConfigError(
                f"tune_beta searches TRADES' beta, but method={self.method!r}; pass method=trades"
            )
        return self
