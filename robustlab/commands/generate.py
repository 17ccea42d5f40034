"""`robustlab generate`: invariance candidates from an MNIST index range, logged to MLflow.

Logs artifact ``candidates.npz`` (arrays ``images`` float32 (N, 28, 28) in [0, 1],
``source_split``, ``source_index``, ``original_label``, ``target_label``, ``eps``,
``neighbour_index`` — the training image moved towards — plus scalars ``norm`` and
``generator_version``) and ``candidates_grid.png``. ``--norm linf`` (Tramèr's L∞ algorithm)
writes one row per source image and ε. ``--norm l0`` (transform search, then difference
clusters) writes up to ``--max-candidates`` ranked rows per source, with ``eps`` 0 and the
extra arrays ``changed_pixels``, ``rank``, ``n_candidates``, ``cluster_subset`` (bit mask),
``n_clusters``, ``knn_target_share``, ``l0_distance`` and ``transform`` (N, 8); which
candidate is a real invariance example is for a human to decide (``robustlab label``).

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
from robustlab.data.mnist import RawMnist, load_raw_mnist
from robustlab.errors import ConfigError, DataError
from robustlab.invariance import l0
from robustlab.invariance.generator import GENERATOR_VERSION, TrainingPool, check_eps, generate_linf

NORMS = ("linf", "l0")
DEFAULT_EPS = ("0.3",)
#: norm=l0 options: (CLI flag, default, least value)
L0_OPTIONS = {
    "transforms": ("--transforms", 2000, 1),
    "seed": ("--seed", 0, 0),
    "max_candidates": ("--max-candidates", 8, 1),
}


def optional_int(text: str) -> int | None:
    """argparse type: an integer; an empty string (MLflow's empty parameter) means not given."""
    if not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


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
        type=optional,
        default=None,
        help="norm=linf: budget(s) in (0, 1), space- or comma-separated (default 0.3)",
    )
    p.add_argument("--norm", default="linf", help="linf (default) or l0")
    p.add_argument(
        "--transforms",
        type=optional_int,
        default=None,
        help="norm=l0: random transforms searched, the cost grows linearly (default 2000)",
    )
    p.add_argument(
        "--seed", type=optional_int, default=None, help="norm=l0: seed of the transforms (0)"
    )
    p.add_argument(
        "--max-candidates",
        type=optional_int,
        default=None,
        help="norm=l0: candidates written per source, best-ranked first (default 8)",
    )
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


def eps_values(args: argparse.Namespace) -> list[str]:
    """The --eps values given (MLflow passes an empty string for 'not given')."""
    return [v for v in (args.eps or []) if v]


def l0_config(args: argparse.Namespace) -> tuple[l0.L0Config, int]:
    """The L0 generator's configuration and --max-candidates, validated."""
    values = {}
    for name, (flag, default, least) in L0_OPTIONS.items():
        v = getattr(args, name)
        v = default if v is None else v
        if v < least:
            raise ConfigError(f"{flag} {v} must be at least {least}")
        values[name] = v
    if values["seed"] > 2**32 - 1:
        raise ConfigError(f"--seed {values['seed']} must lie in [0, 2**32 - 1]")
    config = l0.L0Config(n_transforms=values["transforms"], seed=values["seed"])
    return config, values["max_candidates"]


def check_cheap_args(args: argparse.Namespace) -> tuple[float, ...] | tuple[l0.L0Config, int]:
    """Everything that needs no data: checked before MNIST is loaded or a run exists.

    Returns the ε values (linf) or the L0 configuration and --max-candidates (l0).
    """
    if args.norm not in NORMS:
        raise ConfigError(f"unknown norm {args.norm!r}; choose linf or l0")
    if args.norm == "l0" and eps_values(args):
        raise ConfigError(
            "eps is not used by norm=l0 (it is an L-inf budget); drop --eps "
            "(under mlflow run, use the entry point generate_l0)"
        )
    if args.norm == "linf":
        for name, (flag, _, _) in L0_OPTIONS.items():
            if getattr(args, name) is not None:
                raise ConfigError(f"{flag} is used only by norm=l0; drop it or pass --norm l0")
    if args.split not in ("train", "test"):
        raise ConfigError(f"unknown split {args.split!r}; choose train or test")
    if args.count < 1:
        raise ConfigError(f"--count {args.count} must be at least 1")
    if args.start < 0:
        raise ConfigError(f"--start {args.start} must be >= 0 (the first source index)")
    if args.out:
        check_out(args.out)
    if args.norm == "l0":
        return l0_config(args)
    return parse_eps(eps_values(args) or list(DEFAULT_EPS))


def check_args(
    args: argparse.Namespace, n_split: int
) -> tuple[float, ...] | tuple[l0.L0Config, int]:
    settings = check_cheap_args(args)
    if args.start + args.count > n_split:
        raise ConfigError(
            f"index range {args.start}..{args.start + args.count - 1} is outside the {args.split} "
            f"split (0..{n_split - 1}); lower --start or --count"
        )
    return settings


def make_candidates(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Generate; returns the npz arrays and summary metrics."""
    if args.norm not in NORMS:  # before loading data
        raise ConfigError(f"unknown norm {args.norm!r}; choose linf or l0")
    raw = load_raw_mnist(args.data_dir)
    x_src, y_src = (raw.x_train, raw.y_train) if args.split == "train" else (raw.x_test, raw.y_test)
    settings = check_args(args, len(y_src))
    idx = np.arange(args.start, args.start + args.count, dtype=np.int64)
    if args.norm == "l0":
        config, max_candidates = settings
        return l0_candidates(args, raw, x_src[idx], y_src[idx], idx, config, max_candidates)
    eps = settings
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


def l0_candidates(
    args: argparse.Namespace,
    raw: RawMnist,
    x: np.ndarray,
    y: np.ndarray,
    idx: np.ndarray,
    config: l0.L0Config,
    max_candidates: int,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """L0 candidates (the best-ranked `max_candidates` per source) as npz arrays and metrics."""
    pool = l0.BinaryPool(to_float(raw.x_train), raw.y_train)
    t0 = time.perf_counter()
    res = l0.generate_l0(to_float(x), y, pool, config, source_split=args.split, source_index=idx)
    seconds = (time.perf_counter() - t0) / len(idx)
    rows = [c for per_source in res.candidates for c in per_source[:max_candidates]]
    if not rows:
        raise DataError(
            "no L0 candidates: every difference from the nearest neighbour was DBSCAN noise; "
            "try more --transforms or other sources"
        )
    n_of = {c.source_index: min(max_candidates, len(p)) for p in res.candidates for c in p}
    arrays = {
        "images": np.stack([c.image for c in rows]).astype(np.float32),
        "source_split": np.array([c.source_split for c in rows]),
        "source_index": np.array([c.source_index for c in rows], dtype=np.int64),
        "original_label": np.array([c.original_label for c in rows], dtype=np.int64),
        "target_label": np.array([c.target_label for c in rows], dtype=np.int64),
        "eps": np.zeros(len(rows), dtype=np.float64),  # no L-inf budget
        "neighbour_index": np.array([c.neighbour_index for c in rows], dtype=np.int64),
        "changed_pixels": np.array([c.changed_pixels for c in rows], dtype=np.int64),
        "rank": np.array([c.rank for c in rows], dtype=np.int64),
        "n_candidates": np.array([n_of[c.source_index] for c in rows], dtype=np.int64),
        "cluster_subset": np.array([sum(1 << k for k in c.clusters) for c in rows], np.int64),
        "n_clusters": np.array([c.n_clusters for c in rows], dtype=np.int64),
        "knn_target_share": np.array([c.knn_target_share for c in rows], dtype=np.float64),
        "l0_distance": np.array([c.distance for c in rows], dtype=np.int64),
        "transform": np.array([c.transform for c in rows], dtype=np.float64),
        "norm": np.array("l0"),
        "generator_version": np.array(l0.GENERATOR_VERSION),
    }
    best = [p[0].changed_pixels for p in res.candidates if p]
    metrics = {
        "n_candidates": float(len(rows)),
        "seconds_per_image": seconds,
        "sources_without_candidates": float(sum(not p for p in res.candidates)),
        "median_changed_pixels_rank1": float(np.median(best)),
        "median_l0_distance": float(np.median(res.search.distance)),
    }
    return arrays, metrics


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 MNIST pixels as float32 in [0, 1] (the library's input scale)."""
    return (x / np.float32(255.0)).astype(np.float32)


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
            detail = (
                f"{arrays['changed_pixels'][k]}px r{arrays['rank'][k]}"
                if "changed_pixels" in arrays
                else f"ε{arrays['eps'][k]:g}"
            )
            ax.set_title(
                f"#{arrays['source_index'][k]} {arrays['original_label'][k]}→"
                f"{arrays['target_label'][k]} {detail}",
                fontsize=6,
            )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    import mlflow

    from robustlab.data.mnist import resolve_mnist_path
    from robustlab.tracking import configure_tracking, start_run

    settings = check_cheap_args(args)
    resolve_mnist_path(args.data_dir)
    configure_tracking()  # an unreachable server is reported before generating
    arrays, metrics = make_candidates(args)  # validates before a run is opened
    params = {
        "split": args.split,
        "start": args.start,
        "count": args.count,
        "norm": args.norm,
        "generator_version": str(arrays["generator_version"]),
    }
    if args.norm == "l0":
        config, max_candidates = settings
        params |= {
            "transforms": config.n_transforms,
            "seed": config.seed,
            "max_candidates": max_candidates,
        }
    else:
        params["eps"] = ",".join(f"{e:g}" for e in sorted(set(arrays["eps"].tolist())))
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
