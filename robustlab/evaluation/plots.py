"""Figures logged to MLflow: image grids with predictions, curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(
    rows: Sequence[tuple[str, np.ndarray]],
    labels: np.ndarray,
    predictions: Sequence[np.ndarray],
    path: Path,
    title: str = "",
) -> Path:
    """One row per (name, images) pair; each cell titled 'label→prediction' (red when wrong)."""
    n_rows, n_cols = len(rows), len(rows[0][1])
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.2 * n_cols, 1.45 * n_rows + 0.4), squeeze=False
    )
    for r, ((name, images), preds) in enumerate(zip(rows, predictions, strict=True)):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(
                images[c].reshape(28, 28), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest"
            )
            ok = int(preds[c]) == int(labels[c])
            ax.set_title(
                f"{int(labels[c])}→{int(preds[c])}", fontsize=8, color="black" if ok else "red"
            )
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Path:
    """Lines named by `series` (x, y), with optional shaded (low, high) bands per name."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
        if bands and name in bands:
            ax.fill_between(x, bands[name][0], bands[name][1], alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
