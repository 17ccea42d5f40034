"""Tramèr et al.'s L∞ invariance-example generator, vectorised.

For a source image x of class y and every allowed target class c, the generator finds the
MNIST training image of class c closest (Euclidean, raw 0..255 pixels) to any of 775
rotated/shifted copies of x, aligns it back onto x, projects it into the ε-ball around x and
keeps the target that removes the least ink.

Speed comes from four things, none of which changes the result:

* only the allowed target classes are searched (the others are never selected);
* the spline prefilter runs once per image and per rotation, not once per scipy call;
* distances of 64-dimensional orthonormal projections (one small matrix product per source
  and class) are lower bounds of the true distances; only the few (copy, training image)
  pairs whose bound does not exceed a known distance are scored exactly (integer
  arithmetic), so the selected neighbour is the exact minimiser;
* the nearest-neighbour search is shared by all ε values of one call.

BLAS runs single-threaded here: the products are small, and extra threads only contend.

Ties are broken deterministically: smallest squared distance, then first transform in
:data:`GRID` order, then lowest index within the class's training images (the order in which
scikit-learn's brute-force `NearestNeighbors` and `np.argmin` resolve them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import rotate, shift, spline_filter
from threadpoolctl import threadpool_limits

from robustlab.errors import ConfigError, DataError

GENERATOR_VERSION = "linf-1.0"

#: Classes each source class may be moved towards (Tramèr et al. 2020).
ALLOWED_TARGETS: dict[int, tuple[int, ...]] = {
    0: (4, 6, 8, 9),
    1: (4, 6, 7, 9),
    2: (8,),
    3: (8,),
    4: (8, 9),
    5: (3, 8),
    6: (0,),
    7: (2, 3),
    8: (3,),
    9: (3, 4, 5),
}

SHIFTS = np.linspace(-3.0, 3.0, 5)  # -3, -1.5, 0, 1.5, 3 px
ANGLES = np.linspace(-30.0, 30.0, 31)  # -30..30 degrees, 2 degree steps
#: The 775 transforms (tx, ty, angle), tx slowest and angle fastest.
GRID = np.array([(tx, ty, r) for tx in SHIFTS for ty in SHIFTS for r in ANGLES])
N_PIXELS = 784


def check_eps(eps: Sequence[float]) -> tuple[float, ...]:
    """Validate ε values (fraction of the 0..255 range, 0 < ε < 1)."""
    values = tuple(float(e) for e in eps)
    if not values:
        raise ConfigError("no eps given; pass at least one value in (0, 1), e.g. --eps 0.3")
    for e in values:
        if not 0.0 < e < 1.0:
            raise ConfigError(f"eps={e:g} is outside (0, 1); eps is a fraction of the pixel range")
    return values


def _coefficients(img: np.ndarray) -> np.ndarray:
    """Cubic-spline coefficients exactly as scipy's rotate/shift compute them internally."""
    return spline_filter(img, order=3, output=np.float64, mode="constant")


def transform_copies(x: np.ndarray) -> np.ndarray:
    """The 775 rotated-then-shifted uint8 copies of one 28x28 uint8 image, shape (775, 784).

    Bit-identical to ``shift(rotate(x, r, reshape=False), (tx, ty))`` for every grid point; the
    spline prefilter runs once per image and once per rotation instead of once per call.
    """
    out = np.empty((len(ANGLES), len(SHIFTS), len(SHIFTS), 28, 28), dtype=np.uint8)
    coef = _coefficients(x)
    for k, r in enumerate(ANGLES):
        rotated = rotate(coef, r, reshape=False, output=np.uint8, prefilter=False)
        rcoef = _coefficients(rotated)
        for i, tx in enumerate(SHIFTS):
            for j, ty in enumerate(SHIFTS):
                shift(rcoef, (tx, ty), output=out[k, i, j], prefilter=False)
    return out.transpose(1, 2, 0, 3, 4).reshape(len(GRID), N_PIXELS)


def transform_copies_naive(x: np.ndarray) -> np.ndarray:
    """Reference for :func:`transform_copies`: one scipy rotate + shift call per grid point."""
    return np.stack(
        [shift(rotate(x, r, reshape=False), (tx, ty)).reshape(N_PIXELS) for tx, ty, r in GRID]
    )


def align_back(t: np.ndarray, grid_index: int) -> np.ndarray:
    """Undo transform `grid_index` on a neighbour: rotate by -angle, then shift by -t (uint8)."""
    tx, ty, r = GRID[grid_index]
    return shift(rotate(t, -r, reshape=False), (-tx, -ty))


def project_linf(x: np.ndarray, t: np.ndarray, eps: float) -> np.ndarray:
    """Move x towards t inside the L∞ ball of radius 255·ε; float32 in 0..255.

    Where |t − x| ≤ 255ε and x > 0 the target pixel is copied; where |t − x| > 255ε the pixel
    moves 255ε towards t; the result is clipped to the ball and to [0, 255].
    """
    xf = x.astype(np.float32)
    tf = t.astype(np.float32)
    radius = eps * 255.0
    diff = tf - xf
    adv = xf.copy()
    near = (np.abs(diff) <= radius) & (xf > 0)
    adv[near] = tf[near]
    far = np.abs(diff) > radius
    adv[far] += np.sign(diff[far]) * np.float32(radius)
    adv = np.clip(adv, xf - np.float32(radius), xf + np.float32(radius))
    return np.clip(adv, 0.0, 255.0).astype(np.float32)


def removed_ink(x: np.ndarray, adv: np.ndarray) -> float:
    """Σ max(x/255 − adv/255, 0): how much ink the perturbation removes."""
    return float(np.sum(np.maximum(x / 255.0 - adv / 255.0, 0.0)))


class TrainingPool:
    """Per-class MNIST training images prepared for the nearest-neighbour search.

    Besides the raw pixels it keeps a `rank`-dimensional orthonormal (PCA) projection of every
    image: distances between projections are lower bounds of the true distances.
    """

    def __init__(self, x_train: np.ndarray, y_train: np.ndarray, rank: int = 64) -> None:
        with threadpool_limits(1, user_api="blas"):
            self._build(x_train, y_train, rank)

    def _build(self, x_train: np.ndarray, y_train: np.ndarray, rank: int) -> None:
        if x_train.dtype != np.uint8 or x_train.ndim != 3 or x_train.shape[1:] != (28, 28):
            raise DataError(
                f"training images must be uint8 (N, 28, 28), got {x_train.dtype} {x_train.shape}"
            )
        self.x_train = x_train
        self.y_train = y_train.astype(np.int64)
        flat_all = x_train.reshape(-1, N_PIXELS)
        sample = flat_all[:: max(1, len(flat_all) // 6000)].astype(np.float64)
        self.mean = sample.mean(axis=0)
        centred = sample - self.mean
        _, vecs = np.linalg.eigh(centred.T @ centred)
        self.basis = np.ascontiguousarray(vecs[:, ::-1][:, :rank])
        self.index: dict[int, np.ndarray] = {}
        self.flat: dict[int, np.ndarray] = {}
        self.proj_aug: dict[int, np.ndarray] = {}  # rows [-2·proj, 1, |proj|²]
        self.proj_sqnorm_max: dict[int, float] = {}
        for c in range(10):
            idx = np.flatnonzero(self.y_train == c)
            flat = flat_all[idx]
            proj = self.project(flat)
            sq = np.einsum("ij,ij->i", proj, proj)
            self.index[c] = idx
            self.flat[c] = flat
            self.proj_aug[c] = np.ascontiguousarray(
                np.hstack([-2.0 * proj, np.ones((len(idx), 1), np.float32), sq[:, None]]).T
            )
            self.proj_sqnorm_max[c] = float(sq.max()) if len(sq) else 0.0

    def project(self, flat: np.ndarray) -> np.ndarray:
        """Coordinates in the orthonormal basis (computed in float64, returned as float32)."""
        return ((flat - self.mean) @ self.basis).astype(np.float32)


def _exact_sqdist(
    copies: np.ndarray, flat: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Exact squared distances of the given (copy, training image) pairs (int32 is exact)."""
    out = np.empty(len(rows), dtype=np.int64)
    for s in range(0, len(rows), 4096):
        d = copies[rows[s : s + 4096]].astype(np.int32) - flat[cols[s : s + 4096]].astype(np.int32)
        out[s : s + 4096] = np.einsum("ij,ij->i", d, d)
    return out


@dataclass(frozen=True)
class Neighbour:
    """Nearest neighbour of one source in one class."""

    target: int  # class
    train_index: int  # index into the full training set
    grid_index: int  # transform of the source that came closest
    sqdist: int  # exact squared Euclidean distance (0..255 units)


def nearest_neighbours(
    copies: np.ndarray,
    pool: TrainingPool,
    target: int,
    exclude: int | None = None,
) -> Neighbour:
    """Exact nearest training image of class `target` to any of the 775 `copies` (uint8).

    Lower bounds from the projections (one small matrix product) prune almost every pair; an
    upper bound comes from the best-bounded image of each copy; every pair whose lower bound
    does not exceed it is scored exactly. The result is the exact lexicographic minimum of
    (distance, transform, training index).
    """
    flat = pool.flat[target]
    if len(flat) == 0 or (
        len(flat) == 1 and exclude is not None and pool.index[target][0] == exclude
    ):
        raise DataError(f"the training pool has no images of class {target} to move towards")
    proj = pool.project(copies)
    qsq = np.einsum("ij,ij->i", proj, proj)
    q_aug = np.hstack([proj, qsq[:, None], np.ones((len(proj), 1), np.float32)])
    lower = q_aug @ pool.proj_aug[target]  # |proj(q) - proj(p)|², float32
    excluded_col = None
    if exclude is not None:
        hits = np.flatnonzero(pool.index[target] == exclude)
        if hits.size:
            excluded_col = int(hits[0])
            lower[:, excluded_col] = np.inf
    # upper bound: exact distance of each copy's best-bounded training image
    rows = np.arange(len(copies))
    cols = lower.argmin(axis=1)
    upper = int(_exact_sqdist(copies, flat, rows, cols).min())
    # slack for float32 rounding of the coordinates and of the product: the worst case is
    # below 1e-5 of the squared norms involved, the slack is 100 times that
    slack = 1e-3 * (float(qsq.max()) + pool.proj_sqnorm_max[target]) + 1.0
    rows, cols = np.divmod(np.flatnonzero(lower <= upper + slack), lower.shape[1])
    if excluded_col is not None:
        keep = cols != excluded_col
        rows, cols = rows[keep], cols[keep]
    exact = _exact_sqdist(copies, flat, rows, cols)
    k = np.lexsort((cols, rows, exact))[0]  # distance, then transform, then training index
    return Neighbour(target, int(pool.index[target][cols[k]]), int(rows[k]), int(exact[k]))


@dataclass(frozen=True)
class LinfResult:
    """Generated examples for N sources at E budgets."""

    images: np.ndarray  # float32 (E, N, 28, 28) in 0..255
    target_label: np.ndarray  # int64 (E, N)
    neighbours: list[dict[int, Neighbour]]  # per source: class -> neighbour
    eps: tuple[float, ...]


def select_target(
    x: np.ndarray, aligned: dict[int, np.ndarray], eps: float
) -> tuple[np.ndarray, int]:
    """Project onto every aligned neighbour; keep the one removing least ink (first on ties)."""
    best_adv, best_c, best_ink = None, -1, np.inf
    for c, t in aligned.items():
        adv = project_linf(x, t, eps)
        ink = removed_ink(x, adv)
        if ink < best_ink:
            best_adv, best_c, best_ink = adv, c, ink
    assert best_adv is not None
    return best_adv, best_c


def generate_linf(
    sources: np.ndarray,
    labels: np.ndarray,
    eps: Sequence[float],
    pool: TrainingPool,
    exclude_train_index: np.ndarray | None = None,
) -> LinfResult:
    """L∞ invariance candidates for uint8 `sources` (N, 28, 28) with class `labels`.

    `exclude_train_index[i]` (or -1) is a training index removed from source i's search pool:
    pass the sources' own indices when they are training images.
    """
    eps_t = check_eps(eps)
    if sources.dtype != np.uint8 or sources.ndim != 3 or sources.shape[1:] != (28, 28):
        raise DataError(f"sources must be uint8 (N, 28, 28), got {sources.dtype} {sources.shape}")
    with threadpool_limits(1, user_api="blas"):  # small products: threads only contend
        return _generate_linf(sources, labels, eps_t, pool, exclude_train_index)


def _generate_linf(
    sources: np.ndarray,
    labels: np.ndarray,
    eps_t: tuple[float, ...],
    pool: TrainingPool,
    exclude_train_index: np.ndarray | None,
) -> LinfResult:
    n = sources.shape[0]
    images = np.empty((len(eps_t), n, 28, 28), dtype=np.float32)
    targets = np.empty((len(eps_t), n), dtype=np.int64)
    all_nn: list[dict[int, Neighbour]] = []
    for i in range(n):
        x, y = sources[i], int(labels[i])
        copies = transform_copies(x)
        excl = None
        if exclude_train_index is not None and exclude_train_index[i] >= 0:
            excl = int(exclude_train_index[i])
        nns = {c: nearest_neighbours(copies, pool, c, excl) for c in ALLOWED_TARGETS[y]}
        aligned = {
            c: align_back(pool.x_train[nb.train_index], nb.grid_index) for c, nb in nns.items()
        }
        for k, e in enumerate(eps_t):
            images[k, i], targets[k, i] = select_target(x, aligned, e)
        all_nn.append(nns)
    return LinfResult(images, targets, all_nn, eps_t)


def reference_linf(
    sources: np.ndarray,
    labels: np.ndarray,
    eps: float,
    x_train: np.ndarray,
    y_train: np.ndarray,
    timed: bool = False,
) -> tuple[np.ndarray, ...]:
    """The reference approach: scikit-learn `NearestNeighbors` per class over the 775 copies.

    Searches every class ≠ y (like Tramèr's notebook) with one scipy call per transform, then
    keeps the allowed target removing least ink. Slow; the benchmark and tests use it to check
    :func:`generate_linf`. With `timed` the fit time (seconds) is returned as a third value.
    """
    import time

    from sklearn.neighbors import NearestNeighbors

    t0 = time.perf_counter()
    models = {}
    for c in range(10):
        models[c] = NearestNeighbors(n_neighbors=1).fit(x_train[y_train == c].reshape(-1, N_PIXELS))
    setup = time.perf_counter() - t0
    out = np.empty((len(sources), 28, 28), dtype=np.float32)
    tgt = np.empty(len(sources), dtype=np.int64)
    for i, (x, y) in enumerate(zip(sources, labels, strict=True)):
        copies = transform_copies_naive(x)
        aligned = {}
        for c in range(10):
            if c == y:
                continue
            dist, idx = models[c].kneighbors(copies, n_neighbors=1)
            g = int(np.argmin(dist.ravel()))
            neighbour = x_train[y_train == c][idx.ravel()[g]]
            if c in ALLOWED_TARGETS[int(y)]:
                aligned[c] = align_back(neighbour, g)
        out[i], tgt[i] = select_target(x, aligned, eps)
    return (out, tgt, setup) if timed else (out, tgt)
