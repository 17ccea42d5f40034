"""Keep third-party chatter off the terminal: a command shows robustlab's own lines and progress,
and TensorFlow's start-up notices (oneDNN, `E0000 … NodeDef mentions attribute …` from tf.data),
retracing warnings, MLflow's INFO lines and Keras progress bars appear only with `--verbose`.

`configure` runs before TensorFlow or MLflow is imported (the command line calls it right after
parsing) and records the choice in the environment, so worker processes inherit it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

VERBOSE_ENV = "ROBUSTLAB_VERBOSE"
QUIET_LOGGERS = ("tensorflow", "absl", "h5py", "matplotlib")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") == "1"


def configure(verbose: bool = False) -> None:
    """Quiet TensorFlow's C++ log (TF_CPP_MIN_LOG_LEVEL=3), the tensorflow/absl Python loggers,
    MLflow's INFO lines and ART's missing-PyTorch warning, unless `verbose` (or the
    environment's ROBUSTLAB_VERBOSE=1, set by a verbose parent process)."""
    if verbose or is_verbose():
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # for processes it starts
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # imported already by the parser
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="PyTorch not found")


@contextmanager
def quiet_keras() -> Iterator[None]:
    """Within: Keras progress bars (e.g. from the `predict` MLflow runs on a model's input
    example) go to absl's logger, which stays quiet, unless verbose."""
    import keras

    if is_verbose() or not keras.config.is_interactive_logging_enabled():
        yield
        return
    keras.config.disable_interactive_logging()
    try:
        yield
    finally:
        keras.config.enable_interactive_logging()
