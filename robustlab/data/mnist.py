"""MNIST: locate, validate, scale to [0, 1] and split 55k train / 5k validation / 10k test."""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robustlab.data.validate import check_images, check_labels, to_unit
from robustlab.errors import DataError

DATA_DIR_ENV = "ROBUSTLAB_DATA_DIR"
MNIST_FILE = "mnist.npz"
SPLIT_SEED = 20200101  # fixed: the train/validation split never depends on the run's seed
N_VAL = 5_000
EXPECTED = {
    "x_train": (60_000, 28, 28),
    "y_train": (60_000,),
    "x_test": (10_000, 28, 28),
    "y_test": (10_000,),
}


@dataclass(frozen=True)
class RawMnist:
    """MNIST exactly as stored: uint8 pixels 0..255, labels 0..9."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    path: Path


@dataclass(frozen=True)
class Split:
    """One split: float32 images (N, 28, 28, 1) in [0, 1], int64 labels and their MNIST source."""

    x: np.ndarray
    y: np.ndarray
    source_split: str  # "train" or "test": the MNIST file split the images come from
    source_index: np.ndarray  # index of each image in that MNIST split

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: np.ndarray) -> Split:
        return Split(self.x[idx], self.y[idx], self.source_split, self.source_index[idx])

    def without_sources(self, excluded: np.ndarray) -> Split:
        """Drop every image whose source index is in `excluded` (the leakage guard's output)."""
        keep = ~np.isin(self.source_index, np.asarray(excluded, dtype=np.int64))
        return self.take(np.flatnonzero(keep))


@dataclass(frozen=True)
class Mnist:
    train: Split
    val: Split
    test: Split
    path: Path
    digest: str


def resolve_mnist_path(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Where mnist.npz is: `data_dir`, then $ROBUSTLAB_DATA_DIR, then the Keras cache; else None."""
    for candidate, origin in ((data_dir, "data_dir"), (os.environ.get(DATA_DIR_ENV), DATA_DIR_ENV)):
        if candidate:
            path = Path(candidate).expanduser()
            path = path if path.suffix == ".npz" else path / MNIST_FILE
            if not path.is_file():
                raise DataError(
                    f"{origin}={candidate}: no {MNIST_FILE} there; point {DATA_DIR_ENV} at the folder that holds it"
                )
            return path
    cached = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / MNIST_FILE
    return cached if cached.is_file() else None


def _download() -> Path:
    try:
        from keras.datasets import mnist

        mnist.load_data()
    except Exception as exc:  # noqa: BLE001 - any network failure means the same thing to the user
        raise DataError(
            f"MNIST not found locally and the download failed ({type(exc).__name__}); "
            f"set {DATA_DIR_ENV} (or -P data_dir=) to a folder containing {MNIST_FILE}"
        ) from None
    path = resolve_mnist_path()
    if path is None:
        raise DataError(f"Keras downloaded MNIST but it is not in the cache; set {DATA_DIR_ENV}")
    return path


def load_raw_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> RawMnist:
    """Load and validate mnist.npz (Keras layout) from the first place that has it."""
    path = resolve_mnist_path(data_dir)
    if path is None:
        if not download:
            raise DataError(
                f"{MNIST_FILE} not found; set {DATA_DIR_ENV} to the folder that holds it"
            )
        path = _download()
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in EXPECTED if k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(
            f"{path}: not a readable .npz file ({exc}); replace it with a fresh copy of {MNIST_FILE}"
        ) from None
    missing = sorted(set(EXPECTED) - set(arrays))
    if missing:
        raise DataError(
            f"{path}: missing arrays {missing}; expected the Keras layout {sorted(EXPECTED)}"
        )
    for key, shape in EXPECTED.items():
        if arrays[key].shape != shape:
            raise DataError(f"{path}: {key} has shape {arrays[key].shape}, expected {shape}")
    for key in ("x_train", "x_test"):
        check_images(arrays[key], scale="byte", what=f"{path.name}:{key}")
    for key in ("y_train", "y_test"):
        check_labels(arrays[key], what=f"{path.name}:{key}")
    return RawMnist(path=path, **arrays)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_mnist(
    data_dir: str | os.PathLike | None = None, *, train_size: int = 0, eval_size: int = 0
) -> Mnist:
    """MNIST as float32 [0, 1] splits; `train_size`/`eval_size` > 0 take fixed, seeded subsets.

    Cached per file (path, size, mtime), so an experiment's many runs load and check it once.
    """
    path = resolve_mnist_path(data_dir)
    if path is None:
        return _load_mnist(data_dir, train_size, eval_size)
    stat = path.stat()
    return _load_mnist_cached(str(path), stat.st_size, stat.st_mtime_ns, train_size, eval_size)


@functools.lru_cache(maxsize=2)
def _load_mnist_cached(
    path: str, _size: int, _mtime: int, train_size: int, eval_size: int
) -> Mnist:
    return _load_mnist(path, train_size, eval_size)


def _load_mnist(data_dir: str | os.PathLike | None, train_size: int, eval_size: int) -> Mnist:
    raw = load_raw_mnist(data_dir)
    perm = np.random.default_rng(SPLIT_SEED).permutation(raw.y_train.shape[0])
    val_idx, train_idx = np.sort(perm[:N_VAL]), perm[N_VAL:]
    x_train = to_unit(raw.x_train, scale="byte", what="mnist x_train")
    x_test = to_unit(raw.x_test, scale="byte", what="mnist x_test")
    y_train, y_test = raw.y_train.astype(np.int64), raw.y_test.astype(np.int64)
    train = Split(x_train[train_idx], y_train[train_idx], "train", train_idx.astype(np.int64))
    val = Split(x_train[val_idx], y_train[val_idx], "train", val_idx.astype(np.int64))
    test = Split(x_test, y_test, "test", np.arange(y_test.shape[0], dtype=np.int64))
    if train_size:
        train = train.take(np.arange(min(train_size, len(train))))
    if eval_size:
        test = subsample(test, eval_size, seed=SPLIT_SEED)
    return Mnist(train=train, val=val, test=test, path=raw.path, digest=file_digest(raw.path))


def subsample(split: Split, n: int, *, seed: int) -> Split:
    """A fixed, seeded subset of `n` examples in their original order (all when n >= len)."""
    if n <= 0 or n >= len(split):
        return split
    idx = np.sort(np.random.default_rng(seed).choice(len(split), size=n, replace=False))
    return split.take(idx)
