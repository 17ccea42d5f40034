"""`robustlab generate`: L∞ invariance candidates from an MNIST index range, logged to MLflow.

Logs artifact ``candidates.npz`` (arrays ``images`` float32 (N, 28, 28) in [0, 1],
``source_split``, ``source_index``, ``original_label``, ``target_label``, ``eps``,
``neighbour_index`` — the training image moved towards — plus scalars ``norm`` and
``generator_version``; one row per source image and ε) and ``candidates_grid.png``.

The search pool is always the MNIST training set. With ``--split train`` each source is itself
a training image; it is removed from its own search pool. (Only classes other than the
source's are searched, so the source could never be picked anyway; the explicit exclusion keeps
that guarantee if the allowed-target table ever changes.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from robustlab.commands import SubParsers, optional
from robustlab.data.mnist import load_raw_mnist
from robustlab.errors import ConfigError
from robustlab.invariance.generator import GENERATOR_VERSION, TrainingPool, check_eps, generate_linf

NORMS = ("linf", "l0")


def parse_eps(values: list[str]) -> tuple[float, ...]:
    """`--eps 0.3 0.4` or `--eps 0.3,0.4` -> (0.3, 0.4), validated."""
    out: list[float] = []
    for v in values:
        for part in str(v).split(","):
            if not part.strip():
                continue
            try:
                out.append(float(part))
            except ValueError:
                raise ConfigError(
                    f"eps {part!r} is not a number; pass e.g. --eps 0.3,0.4"
                ) from None
    return check_eps(out)


def add_parser(sub: SubParsers) -> list[str]:
    p = sub.add_parser(
        "generate",
        help="generate invariance-example candidates and log them to MLflow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--split", default="train", help="MNIST split of the source images: train (default) or test"
    )
    p.add_argument("--start", type=int, default=0, help="first source index")
    p.add_argument("--count", type=int, default=500, help="number of source images")
    p.add_argument(
        "--eps",
        nargs="+",
        default=["0.3"],
        help="L-inf budget(s) in (0, 1); space- or comma-separated",
    )
    p.add_argument("--norm", default="linf", help="linf (l0 is not implemented yet)")
    p.add_argument(
        "--data-dir",
        type=optional,
        default=None,
        help="folder with mnist.npz (default $ROBUSTLAB_DATA_DIR, then Keras)",
    )
    p.add_argument(
        "--out", type=optional, default=None, help="also write candidates.npz to this path"
    )
    p.add_argument("--run-name", type=optional, default=None)
    p.set_defaults(func=run)
    return ["generate"]


def check_out(out: str) -> None:
    """--out must be a file path we can write (checked before anything is generated)."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConfigError(
            f"--out {out} is a folder; pass a file path such as {path}/candidates.npz"
        )
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("/"))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write into {folder}; pass a writable path")


def check_cheap_args(args: argparse.Namespace) -> tuple[float, ...]:
    """Everything that needs no data: checked before MNIST is loaded or a run exists."""
    if args.norm not in NORMS:
        raise ConfigError(f"unknown norm {args.norm!r}; choose linf")
    if args.norm == "l0":
        raise ConfigError("the L0 generator is not implemented yet; use --norm linf")
    if args.split not in ("train", "test"):
        raise ConfigError(f"unknown split {args.split!r}; choose train or test")
    if args.count < 1:
        raise ConfigError(f"--count {args.count} must be at least 1")
    if args.start < 0:
        raise ConfigError(f"--start {args.start} must be >= 0 (the first source index)")
    if args.out:
        check_out(args.out)
    return parse_eps(args.eps)


def check_args(args: argparse.Namespace, n_split: int) -> tuple[float, ...]:
    if args.norm not in NORMS:
        raise ConfigError(f"unknown norm {args.norm!r}; choose linf")
    if args.norm == "l0":
        raise ConfigError("the L0 generator is not implemented yet; use --norm linf")
    if args.split not in ("train", "test"):
        raise ConfigError(f"unknown split {args.split!r}; choose train or test")
    if args.count < 1:
        raise ConfigError(f"--count {args.count} must be at least 1")
    if args.start < 0 or args.start + args.count > n_split:
        raise ConfigError(
            f"index range {args.start}..{args.start + args.count - 1} is outside the {args.split} "
            f"split (0..{n_split - 1}); lower --start or --count"
        )
    return parse_eps(args.eps)


def make_candidates(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Generate; returns the npz arrays and summary metrics."""
    if args.norm not in NORMS:  # before loading data
        raise ConfigError(f"unknown norm {args.norm!r}; choose linf")
    raw = load_raw_mnist(args.data_dir)
    x_src, y_src = (raw.x_train, raw.y_train) if args.split == "train" else (raw.x_test, raw.y_test)
    eps = check_args(args, len(y_src))
    idx = np.arange(args.start, args.start + args.count, dtype=np.int64)
    exclude = idx if args.split == "train" else None
    pool = TrainingPool(raw.x_train, raw.y_train)
    t0 = time.perf_counter()
    res = generate_linf(x_src[idx], y_src[idx], eps, pool, exclude_train_index=exclude)
    seconds = (time.perf_counter() - t0) / len(idx)
    e_n = len(eps) * len(idx)
    neighbour = np.array(
        [
            [res.neighbours[i][int(res.target_label[k, i])].train_index for i in range(len(idx))]
            for k in range(len(eps))
        ],
        dtype=np.int64,
    )
    arrays = {
        "images": (res.images / np.float32(255.0)).reshape(e_n, 28, 28).astype(np.float32),
        "source_split": np.full(e_n, args.split),
        "source_index": np.tile(idx, len(eps)),
        "original_label": np.tile(y_src[idx].astype(np.int64), len(eps)),
        "target_label": res.target_label.reshape(e_n),
        "eps": np.repeat(np.asarray(eps, dtype=np.float64), len(idx)),
        "neighbour_index": neighbour.reshape(e_n),
        "norm": np.array(args.norm),
        "generator_version": np.array(GENERATOR_VERSION),
    }
    dist = np.abs(res.images - x_src[idx][None].astype(np.float32)).reshape(len(eps), len(idx), -1)
    metrics = {
        "n_candidates": float(e_n),
        "seconds_per_image": seconds,
        "max_linf_over_eps": float((dist.max(axis=2) / (255.0 * np.asarray(eps))[:, None]).max()),
    }
    return arrays, metrics


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temp file, then os.replace (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_grid(path: Path, arrays: dict[str, np.ndarray], max_items: int = 64) -> None:
    """PNG grid: each candidate with its original -> target label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_items, len(arrays["images"]))
    cols = min(8, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(arrays["images"][k], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(
                f"#{arrays['source_index'][k]} {arrays['original_label'][k]}→"
                f"{arrays['target_label'][k]} ε{arrays['eps'][k]:g}",
                fontsize=6,
            )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    import mlflow

    from robustlab.data.mnist import resolve_mnist_path
    from robustlab.tracking import configure_tracking, start_run

    check_cheap_args(args)
    resolve_mnist_path(args.data_dir)
    configure_tracking()  # an unreachable server is reported before generating
    arrays, metrics = make_candidates(args)  # validates before a run is opened
    eps_text = ",".join(f"{e:g}" for e in sorted(set(arrays["eps"].tolist())))
    params = {
        "split": args.split,
        "start": args.start,
        "count": args.count,
        "eps": eps_text,
        "norm": args.norm,
        "generator_version": GENERATOR_VERSION,
    }
    name = args.run_name or f"generate-{args.split}-{args.start}-{args.count}"
    with (
        start_run(name, params=params, tags={"robustlab.command": "generate"}),
        tempfile.TemporaryDirectory() as tmp,
    ):
        npz = Path(tmp) / "candidates.npz"
        save_npz(npz, arrays)
        grid = Path(tmp) / "candidates_grid.png"
        save_grid(grid, arrays)
        mlflow.log_artifact(str(npz))
        mlflow.log_artifact(str(grid))
        with warnings.catch_warnings():  # a file:// artifact URI matches two source types
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(
                {
                    k: arrays[k]
                    for k in ("images", "source_index", "original_label", "target_label", "eps")
                },
                source=mlflow.get_artifact_uri("candidates.npz"),
                name=f"invariance-candidates-{args.split}-{args.start}-{args.count}",
            )
        mlflow.log_input(dataset, context="generated")
        mlflow.log_metrics(metrics)
        if args.out:
            save_npz(Path(args.out), arrays)
    print(
        f"generated {len(arrays['images'])} candidates ({metrics['seconds_per_image']:.3f} s/image); logged candidates.npz"
        + (f" and wrote {args.out}" if args.out else "")
    )
