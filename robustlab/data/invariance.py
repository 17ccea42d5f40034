"""Human-labelled invariance-based adversarial example sets (see shared data README).

Every set is returned as an :class:`InvarianceSet`: images rescaled to float32 [0, 1], the
original / target / human labels side by side, and the MNIST split and index of each source
image, so that the leakage guard can exclude those sources from evaluation.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from robustlab.data.mnist import DATA_DIR_ENV, load_raw_mnist
from robustlab.data.validate import Scale, check_images, check_labels, to_unit
from robustlab.data.votes import NO_LABEL, NOT_A_DIGIT, check_tie_policy, resolve
from robustlab.errors import DataError

UNKNOWN = NO_LABEL  # label not available (e.g. no human label for a candidate)
SPLIT_SIZES = {"train": 60_000, "test": 10_000}  # images per MNIST file split (source_index range)


@dataclass(frozen=True)
class InvarianceSet:
    """Invariance examples with their provenance; label arrays use -1 for 'unknown'."""

    name: str
    images: np.ndarray  # float32 (N, 28, 28, 1) in [0, 1]
    original_label: np.ndarray  # int64: label of the MNIST source image
    target_label: np.ndarray  # int64: class the attack moved towards (-1 unknown)
    human_label: np.ndarray  # int64: label humans gave the modified image (-1 unknown)
    source_split: str  # MNIST split of the source images ("test" or "train")
    source_index: np.ndarray  # int64 index of each source image in that split
    eps: float
    norm: str  # "linf" or "l0"
    votes: np.ndarray | None = field(default=None)  # int64 (N, raters), -1 = no vote
    # each example's position in the set as loaded (None: 0..N-1), kept through `take`
    example_index: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        x = self.images
        if (
            not isinstance(x, np.ndarray)
            or x.dtype != np.float32
            or x.ndim != 4
            or x.shape[-1] != 1
        ):
            raise DataError(
                f"{self.name}: images must be a float32 array (N, 28, 28, 1), got "
                f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
            )
        if len(x):
            check_images(x, scale="unit", what=f"{self.name} images")
        n = x.shape[0]
        for key in ("original_label", "target_label", "human_label", "source_index"):
            arr = getattr(self, key)
            if arr.shape != (n,):
                raise DataError(f"{self.name}: {key} has shape {arr.shape}, expected ({n},)")
            if not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{self.name}: {key} must hold integers, got dtype {arr.dtype}")
        if n and (self.original_label.min() < 0 or self.original_label.max() > 9):
            raise DataError(f"{self.name}: original labels must lie in 0..9")
        size = SPLIT_SIZES.get(self.source_split)
        if (
            n
            and size is not None
            and (self.source_index.min() < 0 or self.source_index.max() >= size)
        ):
            raise DataError(
                f"{self.name}: source indices must lie in 0..{size - 1} for MNIST split "
                f"{self.source_split!r}, found {self.source_index.min()}..{self.source_index.max()}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def has_human_labels(self) -> bool:
        return bool(np.all(self.human_label >= 0))

    @property
    def label_changed(self) -> np.ndarray:
        """True where humans gave a label different from the source image's label."""
        return (self.human_label >= 0) & (self.human_label != self.original_label)

    @property
    def ids(self) -> np.ndarray:
        """Each example's position in the set as loaded: a stable id across `take`."""
        if self.example_index is None:
            return np.arange(len(self), dtype=np.int64)
        return self.example_index

    def take(self, idx: np.ndarray) -> InvarianceSet:
        votes = None if self.votes is None else self.votes[idx]
        return InvarianceSet(
            self.name,
            self.images[idx],
            self.original_label[idx],
            self.target_label[idx],
            self.human_label[idx],
            self.source_split,
            self.source_index[idx],
            self.eps,
            self.norm,
            votes,
            self.ids[idx],
        )


def invariance_root(data_dir: str | os.PathLike | None = None) -> Path:
    base = data_dir or os.environ.get(DATA_DIR_ENV)
    if not base:
        raise DataError(f"invariance sets need a data folder: set {DATA_DIR_ENV} or pass data_dir")
    root = Path(base).expanduser() / "invariance"
    if not root.is_dir():
        raise DataError(
            f"{root}: folder not found; {DATA_DIR_ENV} must point at the shared data folder"
        )
    return root


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None


def _labels(path: Path, n: int) -> np.ndarray:
    y = _load(path)
    check_labels(y, n=n, what=path.name)
    return y.astype(np.int64)


def read_rater_votes(path: Path) -> dict[str, np.ndarray]:
    """Parse rater_votes.csv: per-rater votes (-1 = missing) beside index and labels."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{path}: no rows")
    raters = sorted(
        (k for k in rows[0] if k.startswith("rater_")), key=lambda k: int(k.split("_")[1])
    )

    def vote(cell: str | None) -> int:
        cell = (cell or "").strip()
        if not cell:
            return UNKNOWN
        return NOT_A_DIGIT if cell.upper() == "X" else int(cell)

    try:
        votes = np.array([[vote(r[k]) for k in raters] for r in rows], dtype=np.int64)
        cols = {
            k: np.array([int(r[k]) for r in rows], dtype=np.int64)
            for k in (
                "mnist_test_index",
                "original_label",
                "target_label",
                "majority_label_as_published",
            )
        }
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path}: malformed row ({exc})") from None
    bad = (
        (votes > NOT_A_DIGIT)
        | (votes < UNKNOWN)
        | ((votes == NOT_A_DIGIT) & ~_x_cells(rows, raters))
    )
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DataError(
            f"{path}: vote {votes[i, j]} of {raters[j]} in row {i} is outside 0..9; "
            "votes must be digits 0..9, X (not a digit) or empty"
        )
    return {"votes": votes, "raters": np.array(raters), **cols}


def _x_cells(rows: list[dict[str, str]], raters: list[str]) -> np.ndarray:
    return np.array(
        [[(r[k] or "").strip().upper() == "X" for k in raters] for r in rows], dtype=bool
    )


def load_thesis_set(
    eps: float = 0.3, data_dir: str | os.PathLike | None = None, *, tie_policy: str | None = None
) -> InvarianceSet:
    """The thesis's 500 L-inf examples from MNIST test images 0..499 (human labels for eps 0.3).

    `tie_policy` None keeps the published labels (a spreadsheet MODE: ties go to the first
    vote). "drop" / "original" / "flag" recompute the labels from the raters' votes
    (:mod:`robustlab.data.votes`): ties are removed from the set, get the source's
    label, or keep label -1. A "not a digit" majority always becomes -1.
    """
    folder = invariance_root(data_dir) / "thesis" / f"eps{eps:g}"
    images = _load(folder / "invariance-based_adversarial_examples.npy")
    n = images.shape[0]
    x = to_unit(images, scale="byte", what=f"thesis eps{eps:g} images")
    target = _labels(folder / "invariance-based_adversarial_examples_new_labels.npy", n)
    source_index = np.arange(n, dtype=np.int64)
    original = load_raw_mnist(data_dir, download=False).y_test[source_index].astype(np.int64)
    human = np.full(n, UNKNOWN, dtype=np.int64)
    votes = None
    human_file = folder / "invariance-based_adversarial_examples_human_labels.npy"
    if human_file.is_file():
        human = _labels(human_file, n)
        table = read_rater_votes(folder / "rater_votes.csv")
        if not np.array_equal(table["mnist_test_index"], source_index) or not np.array_equal(
            table["original_label"], original
        ):
            raise DataError(
                f"{folder}/rater_votes.csv does not match the MNIST test images 0..{n - 1}"
            )
        votes = table["votes"]
    elif tie_policy is not None:
        raise DataError(f"thesis eps{eps:g} has no human votes; tie_policy needs the eps 0.3 set")
    s = InvarianceSet(
        f"thesis_linf_eps{eps:g}",
        x,
        original,
        target,
        human,
        "test",
        source_index,
        eps,
        "linf",
        votes,
    )
    if tie_policy is None or votes is None:
        return s
    policy = check_tie_policy(tie_policy)
    resolved = [resolve(v, o, policy) for v, o in zip(votes, original, strict=True)]
    labels = np.array([lab if 0 <= lab <= 9 else UNKNOWN for lab, _ in resolved], dtype=np.int64)
    s = InvarianceSet(s.name, x, original, target, labels, "test", source_index, eps, "linf", votes)
    if policy == "drop":
        s = s.take(np.flatnonzero([status != "dropped" for _, status in resolved]))
    return s


TRAMER_SETS: dict[str, tuple[str, str, Scale, float, str]] = {
    # name: (images file, labels file, declared scale, eps, norm)
    "tramer_linf_eps0.3": (
        "linf/automated_eps03.npy",
        "linf/automated_eps03_labels.npy",
        "byte",
        0.3,
        "linf",
    ),
    "tramer_linf_eps0.4": (
        "linf/automated_eps04.npy",
        "linf/automated_eps04_labels.npy",
        "byte",
        0.4,
        "linf",
    ),
    "tramer_l0": ("l0/automated.npy", "l0/automated_labels.npy", "byte", 0.0, "l0"),
}


def load_tramer_set(name: str, data_dir: str | os.PathLike | None = None) -> InvarianceSet:
    """One of Tramèr et al.'s published sets (human labels, no per-rater votes)."""
    if name not in TRAMER_SETS:
        raise DataError(f"unknown Tramèr set {name!r}; choose one of {sorted(TRAMER_SETS)}")
    img_file, label_file, scale, eps, norm = TRAMER_SETS[name]
    folder = invariance_root(data_dir) / "tramer2020"
    images = _load(folder / img_file)
    n = images.shape[0]
    x = to_unit(images, scale=scale, what=f"{name} images")
    human = _labels(folder / label_file, n)
    source_index = _load(folder / "indexes.npy").astype(np.int64)
    if source_index.shape != (n,):
        raise DataError(f"{folder}/indexes.npy has shape {source_index.shape}, expected ({n},)")
    original = load_raw_mnist(data_dir, download=False).y_test[source_index].astype(np.int64)
    target = np.full(n, UNKNOWN, dtype=np.int64)
    return InvarianceSet(name, x, original, target, human, "test", source_index, eps, norm)


def load_invariance_set(
    name: str, data_dir: str | os.PathLike | None = None, *, tie_policy: str | None = None
) -> InvarianceSet:
    """Load a set by name: `thesis_linf_eps0.3`, `thesis_linf_eps0.4` or a Tramèr set.

    `tie_policy` applies to the thesis eps 0.3 votes (see :func:`load_thesis_set`).
    """
    if name.startswith("thesis_linf_eps"):
        return load_thesis_set(
            float(name.removeprefix("thesis_linf_eps")), data_dir, tie_policy=tie_policy
        )
    return load_tramer_set(name, data_dir)
