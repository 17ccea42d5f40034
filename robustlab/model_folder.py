"""A model folder on disk (`pretrained/<name>`, a local model URI): an MLflow keras model whose
MLmodel signature is the input contract, float32 (-1, 28, 28, 1) -> (-1, 10) logits, and whose
robustlab metadata records a SHA-256 of each weights file under `data/`; both are checked before
the model is loaded (`check_model_folder`), so missing or altered weights never load."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robustlab.digests import check_digests, file_digests
from robustlab.errors import RobustlabError

INPUT_SHAPE = (-1, 28, 28, 1)
OUTPUT_SHAPE = (-1, 10)
DIGESTS_KEY = "weights_sha256"  # in metadata["robustlab"]: {path under the folder: sha256}
WEIGHTS_DIR = "data"


def signature():
    """The MLflow signature of every robustlab model: float32 images in, float32 logits out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), INPUT_SHAPE)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), OUTPUT_SHAPE)]),
    )


def model_requirements() -> list[str]:
    """Pinned serving requirements (MLflow's inference would re-import the model in a subprocess)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "keras", "tensorflow-cpu", "numpy")]


def weights_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`/data, by its path relative to `folder`."""
    return file_digests(folder, (p for p in (Path(folder) / WEIGHTS_DIR).rglob("*") if p.is_file()))


def is_model_folder(model_uri: str) -> bool:
    """Whether `model_uri` is a local folder (a plain path, not a URI with a scheme)."""
    scheme, sep, _ = model_uri.partition(":")
    return not (sep and len(scheme) >= 2) and Path(model_uri).expanduser().is_dir()


def _contract(spec) -> tuple[str, tuple[int, ...]] | None:
    tensors = getattr(spec, "inputs", None) or []
    if len(tensors) != 1 or not hasattr(tensors[0], "shape"):
        return None
    return str(np.dtype(tensors[0].type)), tuple(int(d) for d in tensors[0].shape)


def check_model_folder(folder: str | Path) -> dict:
    """Refuse (one line) a model folder without MLmodel, whose recorded signature is not the
    input contract, or whose recorded weights files are missing or altered; its robustlab
    metadata. (A folder with no signature is checked by the loaded model's shapes.)"""
    from mlflow.models import Model

    folder = Path(folder).expanduser()
    if not (folder / "MLmodel").is_file():
        raise RobustlabError(f"{folder}: no MLmodel file; not an MLflow model folder")
    try:
        mlmodel = Model.load(str(folder / "MLmodel"))
    except Exception as exc:  # noqa: BLE001 - a corrupt MLmodel
        raise RobustlabError(f"{folder}/MLmodel is unreadable ({type(exc).__name__})") from None
    sig = mlmodel.signature  # none recorded: the loaded model's own shapes are checked instead
    got = (_contract(sig.inputs), _contract(sig.outputs)) if sig is not None else None
    want = (("float32", INPUT_SHAPE), ("float32", OUTPUT_SHAPE))
    if got is not None and got != want:
        raise RobustlabError(
            f"{folder}: its signature takes {got[0]} and gives {got[1]}, not float32 "
            f"{INPUT_SHAPE} images -> {OUTPUT_SHAPE} logits; not a robustlab MNIST model"
        )
    meta = (mlmodel.metadata or {}).get("robustlab") or {}
    check_digests(folder, meta.get(DIGESTS_KEY) or {}, "MLmodel and CARD.md", "restore the folder")
    return meta
