"""Shipped models (`pretrained/<name>`): export a logged model as a small MLflow model folder with
its card, and put such a folder into the local Model Registry as `<name>@champion`.

A shipped folder is an MLflow keras model (MLmodel, `data/model.keras` with float32 inference
weights, requirements, input example), so `mlflow models serve -m pretrained/<name>` and
`robustlab evaluate --model-uri pretrained/<name>` work on it from a fresh clone, and `CARD.md`,
at most `MAX_BYTES` in all. Its MLmodel metadata (`robustlab`) carries what travels with every
robustlab model (excluded MNIST test images, source run, data digest; `robustlab.provenance`
reads them there and fails closed without them) plus the SHA-256 of each weights file (checked
before every load, `robustlab.model_folder`) and its clean accuracy on the check slice: the
first `CHECK_SLICE` MNIST test images outside its excluded ones.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from robustlab.data.mnist import Split
from robustlab.errors import ConfigError, RobustlabError
from robustlab.model_folder import (
    DIGESTS_KEY,
    check_model_folder,
    model_requirements,
    signature,
    weights_digests,
)
from robustlab.provenance import (
    METADATA_KEY,
    VERSION_EXCLUDED_TAG,
    encode_indices,
    model_info,
    require_provenance,
)

CARD = "CARD.md"
CHECK_SLICE = 1000  # images of the check slice (the first ones outside the excluded sources)
MAX_BYTES = 4 * 1024 * 1024
WEIGHTS_TAG = "robustlab.weights_sha256"
SLICE_LINE = "check-slice clean accuracy"  # how CARD.md states the check figure


def check_slice(test: Split, excluded: np.ndarray) -> Split:
    """The fixed check slice: the first `CHECK_SLICE` MNIST test images (by index) that are not
    among the model's excluded sources."""
    rest = test.without_sources(np.asarray(excluded, dtype=np.int64))
    return rest.take(np.arange(min(CHECK_SLICE, len(rest))))


def slice_accuracy(model, data_dir: str | None, excluded: np.ndarray) -> tuple[float, int]:
    """(clean accuracy, images) of `model` on the check slice."""
    from robustlab.data.mnist import load_mnist
    from robustlab.evaluation.stats import predict_logits

    test = check_slice(load_mnist(data_dir).test, excluded)
    pred = predict_logits(model, test.x).argmax(axis=1)
    return float(np.mean(pred == test.y)), len(test)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _card(model_uri: str, name: str, meta: dict, n_excluded: int, registry_name: str) -> str:
    """The source's model card: the description of the version `model_uri` names, or else of
    the version of `registry_name` registered from its run (with its test evaluation), else one
    written from the source run's parameters and the model's metadata."""
    from mlflow.tracking import MlflowClient

    from robustlab.register.card import model_card
    from robustlab.register.publish import existing_version, registered_version

    mv = registered_version(model_uri)
    if mv is None and meta.get("run_id"):
        mv = existing_version(MlflowClient(), registry_name, meta["run_id"])
    if mv is not None and mv.description:
        return mv.description
    try:
        params = MlflowClient().get_run(meta.get("run_id", "")).data.params
    except Exception:  # noqa: BLE001 - the run is not in this store
        params = {}
    return model_card(name, "–", {}, params, meta, n_excluded)


def _shipped_section(name: str, model_uri: str, meta: dict, acc: float, n: int) -> str:
    digests = "; ".join(f"`{k}` SHA-256 `{v}`" for k, v in meta[DIGESTS_KEY].items())
    folder = f"pretrained/{name}"
    return "\n".join(
        [
            f"## This copy ({folder})",
            "",
            f"- float32 inference weights: {digests} (checked before every load)",
            f"- exported from `{model_uri}` (source run `{meta.get('run_id', '?')}`, MNIST file "
            f"digest `{meta.get('data_digest', '?')}`)",
            f"- {SLICE_LINE} **{acc:.4f}** on the first {n} MNIST test images outside its "
            f"{len(meta.get('excluded_test_indices', []))} excluded ones",
            "",
            "```bash",
            f"robustlab evaluate --model-uri {folder}  # strong attacks, on this machine",
            f"mlflow models serve -m {folder} --env-manager local --port 5002",
            f"robustlab register --from {folder}  # into the local registry as champion",
            "```",
            "",
        ]
    )


def export(model_uri: str, out: Path, data_dir: str | None, registry_name: str) -> Path:
    """Write the model at `model_uri` to the folder `out` (which must not exist or be empty):
    float32 weights as an MLflow keras model with its metadata, weights digests and check-slice
    figure, and CARD.md (see `_card`); refused (one line, nothing left behind) above
    `MAX_BYTES`."""
    import mlflow
    from mlflow.models import Model

    from robustlab.tracking import load_keras_model

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--export {out}: already exists and is not empty; remove it first")
    prov = require_provenance(model_uri, False, None)
    model = load_keras_model(model_uri)
    info = model_info(model_uri)
    meta = dict((info.metadata or {}).get(METADATA_KEY) or {})
    meta.update(
        run_id=meta.get("run_id") or info.run_id or "",
        excluded_test_indices=[int(i) for i in prov.excluded],
        excluded_complete=bool(prov.known),
        source_model_uri=model_uri,
    )
    acc, n = slice_accuracy(model, data_dir, prov.excluded)
    meta["check_slice"] = {"n": n, "clean_acc": acc, "first": CHECK_SLICE}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.keras.save_model(
                model,
                path=str(tmp),
                signature=signature(),
                input_example=check_slice_example(data_dir),
                pip_requirements=model_requirements(),
                metadata={METADATA_KEY: meta},
            )
        meta[DIGESTS_KEY] = weights_digests(tmp)
        mlmodel = Model.load(str(tmp / "MLmodel"))
        mlmodel.metadata = {METADATA_KEY: meta}
        mlmodel.save(str(tmp / "MLmodel"))
        card = _card(model_uri, out.name, meta, len(prov.excluded), registry_name)
        (tmp / CARD).write_text(
            card.rstrip() + "\n\n" + _shipped_section(out.name, model_uri, meta, acc, n)
        )
        size = _size(tmp)
        if size > MAX_BYTES:
            raise ConfigError(
                f"{model_uri} takes {size / 2**20:.1f} MB as a model folder, more than the "
                f"{MAX_BYTES / 2**20:.0f} MB a shipped model may take (small_cnn takes ~1.3 MB)"
            )
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"export: {model_uri} -> {out} ({_size(out) / 2**20:.2f} MB; {SLICE_LINE} {acc:.4f} on "
        f"{n} images)",
        file=sys.stderr,
    )
    return out


def check_slice_example(data_dir: str | None) -> np.ndarray:
    """The input example a shipped folder carries: one real MNIST test image, float32."""
    from robustlab.data.mnist import load_mnist

    return load_mnist(data_dir).test.x[:1].astype(np.float32)


def register_from(folder: Path, name: str, force: bool) -> str:
    """Register the shipped model folder as a new version of `name` (its files copied into a
    run's artifacts, its card as the description, its exclusions as the version's) and point
    `champion` at it; the version. An existing champion of other weights moves only with
    `force`; the same weights only get the alias back."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from robustlab.provenance import log_excluded_sources
    from robustlab.register.publish import ALIAS, SOURCE_TAG, current_champion
    from robustlab.tracking import start_run

    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"--from {folder}: no such folder")
    meta = check_model_folder(folder)
    if not meta.get(DIGESTS_KEY):
        raise RobustlabError(f"{folder}: records no weights digest; export it with --export")
    prov = require_provenance(str(folder), False, None)
    if not (folder / CARD).is_file():
        raise RobustlabError(f"{folder}: no {CARD}; export it with --export")
    card = (folder / CARD).read_text()
    digest = ",".join(f"{k}={v}" for k, v in sorted(meta[DIGESTS_KEY].items()))
    client = MlflowClient()
    champ = current_champion(client, name)
    if champ is not None and champ.tags.get(WEIGHTS_TAG) == digest:
        client.set_registered_model_alias(name, ALIAS, champ.version)
        print(f"register: {folder} is {name} version {champ.version} already", file=sys.stderr)
        return str(champ.version)
    if champ is not None and not force:
        raise ConfigError(
            f"{name}@{ALIAS} is version {champ.version}, another model; nothing registered; "
            "pass --force to move the alias to this folder's model"
        )
    tags = {
        WEIGHTS_TAG: digest,
        SOURCE_TAG: str(meta.get("run_id", "")),
        "robustlab.data_digest": str(meta.get("data_digest", "")),
        "robustlab.pretrained": folder.name,
        VERSION_EXCLUDED_TAG: encode_indices(prov.excluded),
        "robustlab.n_excluded": str(len(prov.excluded)),
    }
    acc = (meta.get("check_slice") or {}).get("clean_acc")
    if acc is not None:
        tags["robustlab.check_slice/clean_acc"] = f"{float(acc):.6g}"
    with start_run("register-pretrained", tags=tags, system_metrics=False) as run:
        log_excluded_sources(prov.excluded)
        mlflow.log_artifacts(str(folder), "model")
        source = f"{run.info.artifact_uri}/model"
    if not client.search_registered_models(filter_string=f"name='{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(
        name, source, run_id=run.info.run_id, tags=tags, description=card
    )
    client.set_registered_model_alias(name, ALIAS, mv.version)
    print(f"register: {folder} -> {name} version {mv.version}; {name}@{ALIAS}", file=sys.stderr)
    return str(mv.version)
