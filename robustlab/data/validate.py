"""Boundary checks for every array that enters robustlab.

Inside robustlab images are float32 in [0, 1] with shape (N, 28, 28, 1); files may hold
0..255 ("byte" scale). Each loader declares which scale a file holds and these checks refuse
arrays that do not match, so a scale bug fails loudly instead of silently.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from robustlab.errors import DataError

Scale = Literal["byte", "unit"]
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


def check_images(x: np.ndarray, *, scale: Scale, what: str) -> None:
    """Check shape (N, 28, 28[, 1]), finiteness and that the value range matches `scale`."""
    if x.ndim == 4 and x.shape[-1] == 1:
        spatial = x.shape[1:3]
    elif x.ndim == 3:
        spatial = x.shape[1:]
    else:
        raise DataError(
            f"{what}: expected images of shape (N, 28, 28) or (N, 28, 28, 1), got {x.shape}"
        )
    if tuple(spatial) != IMAGE_SHAPE:
        raise DataError(f"{what}: expected 28x28 images, got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{what}: the array is empty")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{what}: expected numeric pixels, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise DataError(f"{what}: contains NaN or infinite pixels")
    lo, hi = float(x.min()), float(x.max())
    if scale == "unit":
        if lo < 0.0 or hi > 1.0:
            hint = " (looks like 0..255: divide by 255)" if hi > 1.0 else ""
            raise DataError(f"{what}: pixels must lie in [0, 1], found [{lo:g}, {hi:g}]{hint}")
    else:
        if lo < 0.0 or hi > 255.0:
            raise DataError(f"{what}: pixels must lie in 0..255, found [{lo:g}, {hi:g}]")
        if hi <= 1.0:
            raise DataError(
                f"{what}: declared to hold 0..255 pixels but its maximum is {hi:g}; "
                "it looks like it is already scaled to [0, 1]"
            )


def check_labels(y: np.ndarray, *, n: int | None = None, what: str) -> None:
    """Check that labels are integers 0..9, one-dimensional, and `n` long when given."""
    if y.ndim != 1:
        raise DataError(f"{what}: expected a 1-D label array, got shape {y.shape}")
    if n is not None and y.shape[0] != n:
        raise DataError(f"{what}: expected {n} labels (one per image), got {y.shape[0]}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what}: expected integer labels, got dtype {y.dtype}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise DataError(f"{what}: labels must lie in 0..9, found {int(y.min())}..{int(y.max())}")


def to_unit(x: np.ndarray, *, scale: Scale, what: str) -> np.ndarray:
    """Validate `x` against its declared scale and return float32 (N, 28, 28, 1) in [0, 1]."""
    check_images(x, scale=scale, what=what)
    out = x.astype(np.float32)
    if scale == "byte":
        out /= 255.0
    if out.ndim == 3:
        out = out[..., None]
    return out
