"""Tramèr et al.'s L0 invariance-example generator: a transform search, then difference clusters.

Stage A (:func:`search_neighbours`) draws ``n_transforms`` random affine transforms (rotation,
per-axis scale, shear, shift, darkening exponent), applies each to the whole binarised training
set and keeps, for every source, the training image of another class whose transformed copy is
nearest in binarised L0 distance, among transforms that keep more than ``ink_kept`` of its ink.
Stage B (:func:`cluster_subsets`) clusters the pixels where the binarised source and that
transformed neighbour differ (DBSCAN, eps 2, min_samples 5) and makes one candidate per
non-empty subset of clusters: those pixels come from the neighbour, the rest from the source.
Candidates are ranked (:func:`rank_candidates`) by a simple score; which candidate, if any, is
a real invariance example is a human's decision (Tramèr et al. used an AC-GAN score and a human).

Checked against ``l0/invariant_l0_attack.py`` of ftramer/Excessive-Invariance:

* ranges as there: rotation ±0.25 rad, scale 0.8–1.2 per axis, shear ±0.2, shift ±8 px;
  images binarised at 0.5; bilinear sampling, zero outside the frame; every class other than
  the source's is searched (no allowed-target table, unlike the L∞ generator);
* "keeps > 85 % of its ink": the binarised training image warped and warped back (bilinear,
  no darkening) has pixel sum > 0.85 × its own; computed here as one dot product per image,
  since the round trip is linear;
* the darkening exponent d maps a bilinear value v to (1 − (1 − v)^d)^(1/d) before the 0.5
  threshold (so it moves the threshold on v). Their range −0.25…4 includes d < 0, where the
  formula gives inf or NaN (such draws never win); here d is drawn from 0.25…4;
* their "rotation" matrix is [[cos, sin], [sin, cos]] (not a rotation) and their transforms
  pivot at the top-left pixel; here it is a true rotation about the image centre (13.5, 13.5),
  so ``shift`` is the displacement of the centre and a pure shift moves ink by that many pixels;
* their search takes, per transform, the L2-nearest image and then compares binarised L0
  distances; here every (transform, image) pair is compared by binarised L0 directly;
* their script keeps the best of 4 runs of at least 10,000 transforms each (the exact number
  is not published); here one run of ``n_transforms`` (default 2,000);
* transform 0 is the neutral transform (clipped into the ranges): the plain nearest neighbour.

Cost: each transform is a gather plus bitwise logic on the bit-packed training set (64 images
per machine word) and one matrix product with the sources: 25–55 ms per transform for 2
sources, 120–190 ms for 100, on one loaded core (docs/invariance.md). The search is shared by
every source of one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
from threadpoolctl import threadpool_limits

from robustlab.data.validate import check_images, check_labels
from robustlab.errors import ConfigError, DataError

GENERATOR_VERSION = "l0-1.0"
SIDE = 28
N_PIXELS = SIDE * SIDE
CENTRE = (SIDE - 1) / 2.0
#: Columns of a transform parameter vector.
PARAMS = ("angle", "scale_x", "scale_y", "shear_x", "shear_y", "shift_x", "shift_y", "darken")
NEUTRAL = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
_BIG = np.float32(1e6)  # distance of excluded (image, transform) pairs; real ones are <= 784


@dataclass(frozen=True)
class TransformRanges:
    """Ranges the random transforms are drawn from (uniformly, independently per parameter).

    ``rotation`` (radians), ``shear`` and ``shift`` (pixels) are symmetric bounds (0 disables
    them); scale (per axis) and the darkening exponent are [min, max] intervals.
    """

    rotation: float = 0.25
    scale_min: float = 0.8
    scale_max: float = 1.2
    shear: float = 0.2
    shift: float = 8.0
    darken_min: float = 0.25
    darken_max: float = 4.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{f.name} must be a finite number >= 0, got {v}")
        if self.rotation >= math.pi / 2:
            raise ConfigError(f"rotation={self.rotation} rad is too large; use less than pi/2")
        if self.shear >= 1:
            raise ConfigError(f"shear={self.shear} must be < 1 (a shear of 1 is degenerate)")
        for name in ("scale", "darken"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if lo <= 0:
                raise ConfigError(f"{name}_min={lo} must be > 0")
            if lo > hi:
                raise ConfigError(
                    f"{name}_min={lo} > {name}_max={hi}: the {name} range is empty; "
                    f"make {name}_min <= {name}_max"
                )

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of the eight parameters, in :data:`PARAMS` order."""
        r, s, t = self.rotation, self.shear, self.shift
        lo = [-r, self.scale_min, self.scale_min, -s, -s, -t, -t, self.darken_min]
        hi = [r, self.scale_max, self.scale_max, s, s, t, t, self.darken_max]
        return np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)


@dataclass(frozen=True)
class L0Config:
    """Search budget, filters, clustering and ranking of the L0 generator.

    ``n_transforms`` is the search budget: random transforms tried (transform 0 is the neutral
    one); the cost grows linearly with it. ``seed`` fixes the transforms, so results are
    deterministic.
    """

    ranges: TransformRanges = TransformRanges()
    n_transforms: int = 2000
    seed: int = 0
    batch_size: int = 32  # transforms whose sampling grids and ink filters are built at once
    ink_kept: float = 0.85
    dbscan_eps: float = 2.0
    dbscan_min_samples: int = 5
    max_clusters: int = 6  # at most 2**max_clusters - 1 candidates per source
    knn_k: int = 9

    def __post_init__(self) -> None:
        if not isinstance(self.ranges, TransformRanges):
            raise ConfigError("ranges must be a TransformRanges")
        ints = {
            "n_transforms": 1,
            "batch_size": 1,
            "dbscan_min_samples": 1,
            "max_clusters": 1,
            "knn_k": 1,
            "seed": 0,
        }
        for name, least in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {v!r}")
        if self.seed > 2**32 - 1:
            raise ConfigError(f"seed must lie in [0, 2**32 - 1], got {self.seed}")
        if self.max_clusters > 10:
            raise ConfigError(f"max_clusters={self.max_clusters} gives too many subsets; use <= 10")
        if not 0 <= self.ink_kept < 1:
            raise ConfigError(f"ink_kept must lie in [0, 1), got {self.ink_kept}")
        if not (math.isfinite(self.dbscan_eps) and self.dbscan_eps > 0):
            raise ConfigError(f"dbscan_eps must be a finite number > 0, got {self.dbscan_eps}")


# ---- boundary checks -----------------------------------------------------------------------
def check_unit_images(x: np.ndarray, what: str) -> None:
    """float32 (N, 28, 28) with finite pixels in [0, 1], else DataError."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        kind = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{what}: expected float32 images in [0, 1], got {kind}; convert with /255")
    if x.ndim != 3:
        raise DataError(f"{what}: expected shape (N, 28, 28), got {x.shape}")
    check_images(x, scale="unit", what=what)


def binarise(x: np.ndarray) -> np.ndarray:
    """Ink where a pixel is > 0.5 (float32 images in [0, 1]): a bool array of the same shape."""
    return np.asarray(x) > np.float32(0.5)


def l0_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels whose binarised values differ, per image ((..., 28, 28) arrays, broadcast)."""
    return np.count_nonzero(binarise(a) != binarise(b), axis=(-2, -1))


# ---- transforms ----------------------------------------------------------------------------
def sample_transforms(n: int, ranges: TransformRanges, seed: int) -> np.ndarray:
    """(n, 8) parameters: row 0 the neutral transform clipped into the ranges, then uniform draws."""
    lo, hi = ranges.bounds()
    out = np.random.default_rng(seed).uniform(lo, hi, size=(n, len(PARAMS)))
    out[0] = np.clip(NEUTRAL, lo, hi)
    return out


def _linear(params: np.ndarray) -> np.ndarray:
    """(T, 2, 2) linear parts shear @ scale @ rotation, acting on (x, y) = (column, row)."""
    a, sx, sy, hx, hy = (params[:, k] for k in range(5))
    c, s = np.cos(a), np.sin(a)
    one, zero = np.ones_like(a), np.zeros_like(a)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    scale = np.stack([np.stack([sx, zero], -1), np.stack([zero, sy], -1)], -2)
    shear = np.stack([np.stack([one, hx], -1), np.stack([hy, one], -1)], -2)
    return shear @ scale @ rot


_GRID = np.stack(np.meshgrid(np.arange(SIDE), np.arange(SIDE)), -1).reshape(N_PIXELS, 2) - CENTRE


def _bilinear_grid(matrix: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Corners (T, 4, 784) and weights (T, 4, 784) of bilinear sampling at centre + M p + offset.

    Corners outside the frame get index 784 (a zero pixel) and weight 0.
    """
    pts = np.einsum("tij,pj->tpi", matrix, _GRID) + offset[:, None, :] + CENTRE
    base = np.floor(pts)
    frac = pts - base
    x0, y0 = base[..., 0].astype(np.int64), base[..., 1].astype(np.int64)
    fx, fy = frac[..., 0], frac[..., 1]
    corners, weights = [], []
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx))):
        corners.append((y0 + dy, x0 + dx))
        weights.append(w)
    corners.append((y0 + 1, x0 + 1))
    weights.append(fy * fx)
    idx = np.empty((len(pts), 4, N_PIXELS), dtype=np.int64)
    wts = np.empty((len(pts), 4, N_PIXELS), dtype=np.float64)
    for k, ((yy, xx), w) in enumerate(zip(corners, weights, strict=True)):
        inside = (yy >= 0) & (yy < SIDE) & (xx >= 0) & (xx < SIDE)
        idx[:, k] = np.where(inside, yy * SIDE + xx, N_PIXELS)
        wts[:, k] = np.where(inside, w, 0.0)
    return idx, wts


def sampling_grids(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear sampling of the forward warp: the output at p samples centre + L⁻¹(p − t)."""
    inv = np.linalg.inv(_linear(params))
    return _bilinear_grid(inv, -np.einsum("tij,tj->ti", inv, params[:, 5:7]))


def _inverse_grids(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear sampling of the inverse warp (undoes :func:`sampling_grids`' transform)."""
    return _bilinear_grid(_linear(params), params[:, 5:7].copy())


def _bilinear(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Σ_k w_k v_k over axis -2 (4 corners), summed in a fixed order (results are reused bitwise)."""
    w, v = weights, values
    return (
        (w[..., 0, :] * v[..., 0, :] + w[..., 1, :] * v[..., 1, :]) + w[..., 2, :] * v[..., 2, :]
    ) + (w[..., 3, :] * v[..., 3, :])


def _darken(v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(1 − (1 − v)^d)^(1/d) as float32 (v itself for d = 1)."""
    v = np.clip(v, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        dark = (1.0 - (1.0 - v) ** d) ** (1.0 / d)
    return np.where(d == 1.0, v, dark).astype(np.float32)


def warp(images: np.ndarray, params: Sequence[float]) -> np.ndarray:
    """Apply one transform to float32 images (N, 28, 28) in [0, 1]: bilinear, then darkening.

    The content moves forward: output(centre + L(u − centre) + t) = input(u), with
    L = shear @ scale @ rotation; outside the frame is 0.
    """
    check_unit_images(images, "images to warp")
    p = np.asarray(params, dtype=np.float64).reshape(1, len(PARAMS))
    idx, wts = sampling_grids(p)
    flat = np.concatenate(
        [images.reshape(-1, N_PIXELS).astype(np.float64), np.zeros((len(images), 1))], 1
    )
    v = _bilinear(wts[0], flat[:, idx[0]])
    return _darken(v, p[0, 7]).reshape(-1, SIDE, SIDE)


def _pattern_values(weights: np.ndarray, darken: np.ndarray) -> np.ndarray:
    """(T, 784, 16) float32: output pixel p's value when its four corners hold bit pattern m.

    A binary image's warp is a lookup in this table (:func:`_warp_binary`), and stage A's
    binarised warp uses ``binarise`` of the same table, so both agree bit for bit.
    """
    patterns = ((np.arange(16)[:, None] >> np.arange(4)) & 1).astype(np.float64)  # (16, 4)
    v = _bilinear(weights[:, None], patterns[None, :, :, None])  # (T, 16, 784)
    return _darken(v, darken[:, None, None]).transpose(0, 2, 1)


def _warp_binary(bits: np.ndarray, corners: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One binary image (784,) warped by one transform's corners and pattern values: (784,)."""
    padded = np.append(bits.astype(np.int64), 0)
    code = sum(padded[corners[k]] << k for k in range(4))
    return values[np.arange(N_PIXELS), code]


def _minimal_terms(tables: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """The minimal true patterns of each pixel's monotone function, grouped by pattern."""
    out = []
    for m in range(1, 16):
        proper = [s for s in range(1, 16) if s & m == s and s != m]
        minimal = tables[:, m] & ~np.any(tables[:, proper], axis=1) if proper else tables[:, m]
        rows = np.flatnonzero(minimal)
        if rows.size:
            out.append((tuple(k for k in range(4) if m >> k & 1), rows))
    return out


def _warp_packed(packed: np.ndarray, corners: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Binarised warp of every packed image at once: (784, W) uint64, bit j = image 64w + j.

    Each output pixel is a monotone function of its four corner bits, evaluated as an OR of
    ANDs on whole machine words.
    """
    corner_bits = packed[corners]  # (4, 784, W)
    out = np.zeros(corner_bits.shape[1:], dtype=np.uint64)
    for ks, rows in _minimal_terms(table):
        term = corner_bits[ks[0], rows]
        for k in ks[1:]:
            term &= corner_bits[k, rows]
        out[rows] |= term
    return out


def ink_kept(images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """(N, T) share of each binarised image's ink left after warping there and back (bilinear).

    The round trip is linear, so its pixel sum is one dot product with a per-transform vector.
    """
    check_unit_images(images, "images")
    dense = binarise(images.reshape(-1, N_PIXELS)).astype(np.float32)
    ink = dense.sum(axis=1)
    return (dense @ _round_trip_vectors(np.atleast_2d(params)).T) / np.maximum(ink, 1)[:, None]


def _round_trip_vectors(params: np.ndarray) -> np.ndarray:
    """(T, 784) float32 u with Σ(round trip of x) = u · x: u = Mᵀ(M_invᵀ 1)."""
    fwd_idx, fwd_w = sampling_grids(params)
    inv_idx, inv_w = _inverse_grids(params)
    out = np.empty((len(params), N_PIXELS), dtype=np.float32)
    for t in range(len(params)):
        col = np.bincount(inv_idx[t].ravel(), inv_w[t].ravel(), minlength=N_PIXELS + 1)
        out[t] = np.bincount(
            fwd_idx[t].ravel(), (fwd_w[t] * col[None, :N_PIXELS]).ravel(), minlength=N_PIXELS + 1
        )[:N_PIXELS]
    return out


# ---- stage A -------------------------------------------------------------------------------
class BinaryPool:
    """The search pool (the MNIST training set) binarised at 0.5, in the layouts the search uses."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        check_unit_images(images, "training images")
        check_labels(np.asarray(labels), n=len(images), what="training labels")
        bits = binarise(images.reshape(-1, N_PIXELS))
        self.labels = np.asarray(labels).astype(np.int64)
        self.bits = bits
        self.dense = bits.astype(np.float32)  # (N, 784) for matrix products
        self.ink = self.dense.sum(axis=1)
        packed = np.packbits(bits.T, axis=1, bitorder="little")  # (784, ceil(N / 8))
        words = -(-packed.shape[1] // 8)
        full = np.zeros((N_PIXELS + 1, words * 8), dtype=np.uint8)  # row 784: outside the frame
        full[:N_PIXELS, : packed.shape[1]] = packed
        self.packed = full.view(np.uint64)

    def __len__(self) -> int:
        return len(self.labels)


def warp_pool(pool: BinaryPool, params: Sequence[float]) -> np.ndarray:
    """Every pool image binarised and warped by one transform, as stage A sees them: bool (N, 28, 28)."""
    p = np.asarray(params, dtype=np.float64).reshape(1, len(PARAMS))
    corners, weights = sampling_grids(p)
    bits = _warp_packed(pool.packed, corners[0], binarise(_pattern_values(weights, p[:, 7]))[0])
    flat = np.unpackbits(bits.view(np.uint8), axis=1, count=len(pool), bitorder="little")
    return flat.T.reshape(-1, SIDE, SIDE).astype(bool)


@dataclass(frozen=True)
class NeighbourSearch:
    """Stage A's result per source: the nearest transformed training image of another class."""

    distance: np.ndarray  # int64 (Q,): binarised L0, source vs transformed neighbour
    train_index: np.ndarray  # int64 (Q,)
    transform_index: np.ndarray  # int64 (Q,): row of `transforms`
    transforms: np.ndarray  # (T, 8) every transform tried

    def params(self, q: int) -> np.ndarray:
        return self.transforms[self.transform_index[q]]


_CHUNK_WORDS = 4  # words of 64 images unpacked at once: small enough to stay in cache


def _products(left: np.ndarray, bits: np.ndarray, buffer: np.ndarray, out: np.ndarray) -> None:
    """out = left @ unpack(bits): (Q, 784) times the (784, lanes) 0/1 matrix, chunk by chunk."""
    b8 = bits.view(np.uint8)
    for w in range(0, bits.shape[1], _CHUNK_WORDS):
        e = min(bits.shape[1], w + _CHUNK_WORDS)
        part = buffer[:, : (e - w) * 64]
        np.copyto(part, np.unpackbits(b8[:, w * 8 : e * 8], axis=1, bitorder="little"))
        np.matmul(left, part, out=out[:, w * 64 : e * 64])


def search_neighbours(
    sources: np.ndarray,
    labels: np.ndarray,
    pool: BinaryPool,
    config: L0Config,
    exclude: np.ndarray | None = None,
    transforms: np.ndarray | None = None,
) -> NeighbourSearch:
    """Stage A for float32 `sources` (Q, 28, 28) in [0, 1] with class `labels`.

    For every transform (default: :func:`sample_transforms` with the config's budget and seed)
    and every training image of another class whose transform keeps more than
    ``config.ink_kept`` of its ink, the binarised L0 distance to each source; returns the
    minimum (ties: first transform, then lowest training index). ``exclude[q]`` (or -1) is a
    training index never used for source q (its own index when sources are training images).
    """
    check_unit_images(sources, "sources")
    labels = np.asarray(labels)
    check_labels(labels, n=len(sources), what="source labels")
    if transforms is None:
        transforms = sample_transforms(config.n_transforms, config.ranges, config.seed)
    transforms = np.asarray(transforms, dtype=np.float64).reshape(-1, len(PARAMS))
    own = np.full(len(sources), -1) if exclude is None else np.asarray(exclude)
    if own.shape != (len(sources),):
        raise DataError(f"exclude has shape {own.shape}; pass one index (or -1) per source")
    parts = [
        _search(
            sources[b : b + _BLOCK],
            labels[b : b + _BLOCK],
            pool,
            config,
            own[b : b + _BLOCK],
            transforms,
        )
        for b in range(0, len(sources), _BLOCK)
    ]
    if len(parts) == 1:
        return parts[0]
    return NeighbourSearch(
        *(
            np.concatenate([getattr(r, k) for r in parts])
            for k in ("distance", "train_index", "transform_index")
        ),
        transforms,
    )


_BLOCK = 256  # sources searched together: bounds the (sources x images) distance matrix


def _search(
    sources: np.ndarray,
    labels: np.ndarray,
    pool: BinaryPool,
    config: L0Config,
    exclude: np.ndarray,
    transforms: np.ndarray,
) -> NeighbourSearch:
    q_bits = binarise(sources.reshape(-1, N_PIXELS)).astype(np.float32)
    # |a XOR q| = Σ_p a_p (1 − 2 q_p) + |q|: one product per transform, exact in float32
    signed = 1 - 2 * q_bits
    lanes = pool.packed.shape[1] * 64  # images, padded to whole words
    static = np.full((len(sources), lanes), _BIG, dtype=np.float32)  # padding lanes: never
    static[:, : len(pool)] = np.where(pool.labels[None, :] == labels[:, None], _BIG, 0)
    static += q_bits.sum(axis=1)[:, None]
    for q, i in enumerate(exclude):
        if i >= 0:
            static[q, i] = _BIG
    best = np.full(len(sources), _BIG, dtype=np.float32)
    best_i = np.zeros(len(sources), dtype=np.int64)
    best_t = np.zeros(len(sources), dtype=np.int64)
    rows = np.arange(len(sources))
    dist = np.empty_like(static)
    buffer = np.empty((N_PIXELS, _CHUNK_WORDS * 64), dtype=np.float32)
    unkept = np.full(lanes, _BIG, dtype=np.float32)
    with threadpool_limits(1, user_api="blas"):  # small products: threads only contend
        for start in range(0, len(transforms), config.batch_size):
            batch = transforms[start : start + config.batch_size]
            corners, weights = sampling_grids(batch)
            tables = binarise(_pattern_values(weights, batch[:, 7]))
            kept = pool.dense @ _round_trip_vectors(batch).T > config.ink_kept * pool.ink[:, None]
            for j in range(len(batch)):
                bits = _warp_packed(pool.packed, corners[j], tables[j])
                _products(signed, bits, buffer, dist)
                dist += static
                unkept[: len(pool)] = np.where(kept[:, j], 0, _BIG)
                dist += unkept
                i = dist.argmin(axis=1)
                d = dist[rows, i]
                better = d < best
                best[better], best_i[better], best_t[better] = d[better], i[better], start + j
    if (best >= _BIG).any():
        q = int(np.flatnonzero(best >= _BIG)[0])
        raise DataError(
            f"source {q}: no training image of another class keeps > {config.ink_kept:g} of its "
            "ink under any transform; widen the ranges or add training images"
        )
    return NeighbourSearch(best.astype(np.int64), best_i, best_t, transforms)


# ---- stage B -------------------------------------------------------------------------------
def difference_clusters(
    source: np.ndarray, neighbour: np.ndarray, eps: float = 2.0, min_samples: int = 5
) -> np.ndarray:
    """(28, 28) int: DBSCAN cluster 0..C-1 of each pixel where the binarised images differ.

    -1 marks pixels that agree and differing pixels DBSCAN calls noise. Clusters are numbered
    in row-major order of their first pixel (DBSCAN's order).
    """
    from sklearn.cluster import DBSCAN

    diff = binarise(source) != binarise(neighbour)
    out = np.full((SIDE, SIDE), -1, dtype=np.int64)
    points = np.argwhere(diff)
    if len(points):
        out[diff] = DBSCAN(eps=eps, min_samples=min_samples).fit(points).labels_
    return out


@dataclass(frozen=True)
class L0Candidate:
    """One candidate: the source with the pixels of some clusters taken from the neighbour."""

    image: np.ndarray  # float32 (28, 28) in [0, 1]
    source_split: str
    source_index: int
    original_label: int
    target_label: int  # the neighbour's class
    neighbour_index: int  # training index of the neighbour
    changed_pixels: int  # binarised, against the source
    clusters: tuple[int, ...]  # the cluster subset taken from the neighbour
    n_clusters: int  # clusters DBSCAN found in the difference
    distance: int  # stage A: every differing pixel (all clusters and noise)
    transform: tuple[float, ...]  # the neighbour's transform, PARAMS order
    knn_target_share: float = float("nan")  # rank score: see rank_candidates
    rank: int = 0  # 1 = shown first among the source's candidates


@dataclass(frozen=True)
class Subset:
    """One non-empty subset of difference clusters and the image it gives."""

    clusters: tuple[int, ...]
    changed_pixels: int  # binarised, against the source
    image: np.ndarray  # float32 (28, 28) in [0, 1]


def cluster_subsets(
    source: np.ndarray, neighbour: np.ndarray, config: L0Config
) -> tuple[list[Subset], int]:
    """Every non-empty subset of difference clusters, and the number of clusters found.

    A subset's image takes its clusters' pixels from `neighbour` and every other pixel from
    `source` (float32 (28, 28) in [0, 1]). Only the ``config.max_clusters`` largest clusters
    are used (ties: lower number first); the others, like DBSCAN noise, are never taken.
    """
    check_unit_images(source[None], "source")
    check_unit_images(neighbour[None], "neighbour")
    labels = difference_clusters(source, neighbour, config.dbscan_eps, config.dbscan_min_samples)
    n = int(labels.max()) + 1
    sizes = np.bincount(labels[labels >= 0], minlength=n)
    used = sorted(np.argsort(-sizes, kind="stable")[: config.max_clusters].tolist())
    out = []
    for mask in range(1, 2 ** len(used)):
        subset = tuple(c for k, c in enumerate(used) if mask >> k & 1)
        image = np.where(np.isin(labels, subset), neighbour, source).astype(np.float32)
        out.append(Subset(subset, int(l0_distance(image, source)), image))
    return out, n


def knn_target_share(
    images: np.ndarray, target: int, pool: BinaryPool, k: int, exclude: int = -1
) -> np.ndarray:
    """Share of each image's k nearest training images (binarised L0) that are of `target`.

    Ties at the k-th distance go to the lower training index; `exclude` is left out.
    """
    bits = binarise(images.reshape(-1, N_PIXELS)).astype(np.float32)
    with threadpool_limits(1, user_api="blas"):
        dist = pool.ink[None, :] + bits.sum(axis=1)[:, None] - 2 * (bits @ pool.dense.T)
    if exclude >= 0:
        dist[:, exclude] = np.inf
    kth = np.partition(dist, k - 1, axis=1)[:, k - 1 : k]
    shares = np.empty(len(bits))
    for r in range(len(bits)):
        near = np.flatnonzero(dist[r] < kth[r])
        near = np.concatenate([near, np.flatnonzero(dist[r] == kth[r])[: k - len(near)]])
        shares[r] = np.mean(pool.labels[near] == target)
    return shares


def rank_candidates(candidates: list[L0Candidate]) -> list[L0Candidate]:
    """Order one source's candidates and number them 1..n (the score is k-NN based).

    First the candidates whose k nearest training images are mostly (> 1/2) of the target
    class, fewest changed pixels first: the smallest change that looks like the target. Then
    the rest, highest share of the target class first (the closest to looking like it), then
    fewest changed pixels. Remaining ties: fewer clusters, earlier subset. The order only
    decides what a human looks at first.
    """

    def key(c: L0Candidate) -> tuple:
        majority = c.knn_target_share > 0.5
        first = c.changed_pixels if majority else -c.knn_target_share
        return (not majority, first, c.changed_pixels, len(c.clusters), c.clusters)

    return [replace(c, rank=r + 1) for r, c in enumerate(sorted(candidates, key=key))]


def warp_neighbour(pool: BinaryPool, index: int, params: np.ndarray) -> np.ndarray:
    """Training image `index`, binarised and transformed exactly as stage A saw it: (28, 28)."""
    p = np.asarray(params, dtype=np.float64).reshape(1, len(PARAMS))
    corners, weights = sampling_grids(p)
    values = _pattern_values(weights, p[:, 7])[0]
    return _warp_binary(pool.bits[index], corners[0], values).reshape(SIDE, SIDE)


@dataclass(frozen=True)
class L0Result:
    """Ranked candidates per source, and stage A's search."""

    candidates: list[list[L0Candidate]]
    search: NeighbourSearch


def generate_l0(
    sources: np.ndarray,
    labels: np.ndarray,
    pool: BinaryPool,
    config: L0Config,
    *,
    source_split: str = "test",
    source_index: np.ndarray | None = None,
    transforms: np.ndarray | None = None,
) -> L0Result:
    """Ranked L0 candidates for float32 `sources` (N, 28, 28) in [0, 1] with class `labels`.

    With ``source_split="train"`` each source's own training index is removed from its search
    and k-NN pools. A source whose differences are all DBSCAN noise gets no candidates. The
    final choice among the ranked candidates is a human's.
    """
    check_unit_images(sources, "sources")
    if source_split not in ("train", "test"):
        raise ConfigError(f"unknown split {source_split!r}; choose train or test")
    idx = np.arange(len(sources)) if source_index is None else np.asarray(source_index)
    if idx.shape != (len(sources),):
        raise DataError(f"source_index has shape {idx.shape}; pass one index per source")
    own = idx if source_split == "train" else np.full(len(sources), -1)
    search = search_neighbours(sources, labels, pool, config, own, transforms)
    out: list[list[L0Candidate]] = []
    for q in range(len(sources)):
        i, params = int(search.train_index[q]), search.params(q)
        subsets, n_clusters = cluster_subsets(sources[q], warp_neighbour(pool, i, params), config)
        target = int(pool.labels[i])
        shares = (
            knn_target_share(
                np.stack([s.image for s in subsets]), target, pool, config.knn_k, own[q]
            )
            if subsets
            else np.empty(0)
        )
        cands = [
            L0Candidate(
                image=s.image,
                source_split=source_split,
                source_index=int(idx[q]),
                original_label=int(labels[q]),
                target_label=target,
                neighbour_index=i,
                changed_pixels=s.changed_pixels,
                clusters=s.clusters,
                n_clusters=n_clusters,
                distance=int(search.distance[q]),
                transform=tuple(float(v) for v in params),
                knn_target_share=float(share),
            )
            for s, share in zip(subsets, shares, strict=True)
        ]
        out.append(rank_candidates(cands))
    return L0Result(out, search)
