"""Keep third-party chatter off the terminal: a command shows robustlab's own lines and progress,
and TensorFlow's start-up notices (oneDNN, `E0000 … NodeDef mentions attribute …` from tf.data),
retracing warnings, MLflow's INFO lines and artifact progress bars and Keras progress bars appear
only with `--verbose`.

`configure` runs before TensorFlow or MLflow is imported (the command line calls it right after
parsing) and records the choice in the environment, so worker processes inherit it. On CPUs
where TensorFlow turns oneDNN on by default (AVX-512 hosts), TensorFlow logs a notice while it is
imported, before its logging is set up, and TF_CPP_MIN_LOG_LEVEL does not reach it: `configure`
therefore also runs TensorFlow's import with the process's stderr (fd 2) in a file and replays
every line of it but those notices.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

VERBOSE_ENV = "ROBUSTLAB_VERBOSE"
QUIET_LOGGERS = ("tensorflow", "absl", "h5py", "matplotlib")
# what TensorFlow's C++ code prints while it is imported, before its log level applies
IMPORT_NOTICES = re.compile(r"absl::InitializeLog\(\) is called|\] oneDNN custom operations are on")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") == "1"


def configure(verbose: bool = False) -> None:
    """Quiet TensorFlow's C++ log (TF_CPP_MIN_LOG_LEVEL=3), the tensorflow/absl Python loggers,
    MLflow's INFO lines and artifact progress bars and ART's missing-PyTorch warning, unless `verbose` (or the
    environment's ROBUSTLAB_VERBOSE=1, set by a verbose parent process)."""
    if verbose or is_verbose():
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # for processes it starts
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # read at each call
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # imported already by the parser
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="PyTorch not found")
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


@contextmanager
def stderr_without(pattern: re.Pattern[str]) -> Iterator[None]:
    """Within: what anything in the process (C++ libraries included) writes to fd 2 goes to a
    file; at the end every line of it not matching `pattern` is written to stderr. Without a
    usable fd 2 the block runs unfiltered."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not pattern.search(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once (then leaves `sys.meta_path`) and has its module code run inside
    `stderr_without(IMPORT_NOTICES)`; everything else is found as usual."""

    def find_spec(self, name, path=None, target=None):  # noqa: ARG002 - the finder protocol
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    """A module loader run inside `stderr_without(IMPORT_NOTICES)`; the rest is the real one."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with stderr_without(IMPORT_NOTICES):
            self._loader.exec_module(module)

    def __getattr__(self, name: str):  # resource readers, get_data, is_package, ...
        return getattr(self._loader, name)


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
