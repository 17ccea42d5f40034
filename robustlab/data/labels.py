"""A versioned, crash-safe store of human labels for invariance examples.

On disk a store is one JSON file (``format_version`` 1)::

    {"format": "robustlab-label-store", "format_version": 1, "name": ..., "tie_policy": ...,
     "created": ISO-8601, "updated": ISO-8601,
     "image_encoding": "float32-le-base64 28x28 [0,1]",
     "examples": [{"id", "source_split", "source_index", "eps", "norm", "original_label",
                   "target_label", "published_label", "votes": {rater: vote}, "image",
                   "human_label", "status", "label_changed"}, ...]}

L0 candidates also carry ``changed_pixels``, ``rank`` and ``n_candidates`` (candidate k of n
for its source image); these fields are optional: stores without them load as before.

A vote is an integer 0..9 (the digit a rater saw) or 10 (:data:`NOT_A_DIGIT`, "X" on the
page). ``human_label`` / ``status`` / ``label_changed`` are derived from the votes under the
store's tie policy and rewritten on every save (readers need not recompute them):

* a unique most-voted answer is the human label (status ``labelled``; 10 means "not a digit");
* on a tie, policy ``drop`` gives -1 / ``dropped``, ``original`` gives the source's label /
  ``tie-original``, ``flag`` gives -1 / ``flagged`` (needs more votes);
* with no votes, a published label (Tramèr sets) is used (``published``), else -1 /
  ``unlabelled``.

Every save writes a temporary file in the same folder and ``os.replace``s it over the store,
so a crash never leaves a half-written store.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from robustlab.data.invariance import (
    InvarianceSet,
    invariance_root,
    load_thesis_set,
    load_tramer_set,
    read_rater_votes,
)
from robustlab.data.votes import (
    NO_LABEL,
    NOT_A_DIGIT,
    TiePolicy,
    check_tie_policy,
    check_vote,
    resolve,
)
from robustlab.errors import ConfigError, DataError

FORMAT = "robustlab-label-store"
FORMAT_VERSION = 1
IMAGE_ENCODING = "float32-le-base64 28x28 [0,1]"
CANDIDATE_FIELDS = ("changed_pixels", "rank", "n_candidates")  # optional, L0 candidates


def encode_image(img: np.ndarray) -> str:
    a = np.asarray(img, dtype="<f4").reshape(28, 28)
    if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
        raise DataError("example images must be 28x28 with pixels in [0, 1]")
    return base64.b64encode(a.tobytes()).decode("ascii")


def decode_image(text: str) -> np.ndarray:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) != 28 * 28 * 4:
        raise ValueError(f"image has {len(raw)} bytes, expected {28 * 28 * 4}")
    img = np.frombuffer(raw, dtype="<f4").reshape(28, 28).astype(np.float32)
    if not np.all(np.isfinite(img)) or img.min() < 0 or img.max() > 1:
        raise ValueError("image pixels must be finite and lie in [0, 1]")
    return img


@dataclass
class Example:
    """One invariance example and every rater's vote on it."""

    id: str
    source_split: str
    source_index: int
    eps: float
    norm: str
    original_label: int
    target_label: int  # -1 unknown
    image: np.ndarray  # float32 (28, 28) in [0, 1]
    published_label: int = NO_LABEL  # label given by the set's publisher (no votes)
    votes: dict[str, int] = field(default_factory=dict)
    # L0 candidates only (None otherwise): pixels changed, candidate `rank` of `n_candidates`
    changed_pixels: int | None = None
    rank: int | None = None
    n_candidates: int | None = None

    def resolved(self, policy: TiePolicy) -> tuple[int, str]:
        return resolve(self.votes.values(), self.original_label, policy, self.published_label)


class LabelStore:
    """Examples and votes, saved atomically to one JSON file."""

    def __init__(
        self,
        path: str | os.PathLike,
        examples: list[Example],
        *,
        name: str = "",
        tie_policy: TiePolicy = "flag",
        created: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.examples = examples
        self.name = name
        self.tie_policy = check_tie_policy(tie_policy)
        self.created = created or _now()
        self._by_id = {e.id: e for e in examples}
        if len(self._by_id) != len(examples):
            raise DataError(f"{self.path}: example ids are not unique")

    # ---- persistence -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelStore:
        """Read a store; corrupt files and newer format versions raise DataError."""
        p = Path(path)
        if not p.is_file():
            raise DataError(
                f"{p}: label store not found; create it with `robustlab label --init-from`"
            )
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(
                f"{p}: corrupt label store (not valid JSON: {exc}); restore it from a backup"
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise DataError(f"{p}: not a robustlab label store (missing format={FORMAT!r})")
        version = doc.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise DataError(f"{p}: corrupt label store (format_version={version!r})")
        if version > FORMAT_VERSION:
            raise DataError(
                f"{p}: label store format_version {version} is newer than this robustlab "
                f"supports ({FORMAT_VERSION}); upgrade robustlab"
            )
        try:
            examples = [_example_from_json(r) for r in doc["examples"]]
            return cls(
                p,
                examples,
                name=str(doc.get("name", "")),
                tie_policy=doc.get("tie_policy", "flag"),
                created=doc.get("created"),
            )
        except DataError as exc:
            raise DataError(f"{p}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(
                f"{p}: corrupt label store ({type(exc).__name__}: {exc}); restore it from a backup"
            ) from None

    def to_json(self) -> dict[str, Any]:
        records = []
        for e in self.examples:
            label, status = e.resolved(self.tie_policy)
            records.append(
                {
                    "id": e.id,
                    "source_split": e.source_split,
                    "source_index": e.source_index,
                    "eps": e.eps,
                    "norm": e.norm,
                    "original_label": e.original_label,
                    "target_label": e.target_label,
                    "published_label": e.published_label,
                    "votes": dict(e.votes),
                    "human_label": label,
                    "status": status,
                    "label_changed": bool(0 <= label != e.original_label),
                    "image": encode_image(e.image),
                }
                | {k: getattr(e, k) for k in CANDIDATE_FIELDS if getattr(e, k) is not None}
            )
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "tie_policy": self.tie_policy,
            "created": self.created,
            "updated": _now(),
            "image_encoding": IMAGE_ENCODING,
            "not_a_digit_vote": NOT_A_DIGIT,
            "examples": records,
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write atomically: temp file in the same folder, fsync, os.replace."""
        target = Path(path) if path is not None else self.path
        target.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.to_json(), separators=(",", ":")).encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    # ---- votes -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.examples)

    def get(self, example_id: str) -> Example:
        try:
            return self._by_id[example_id]
        except KeyError:
            raise DataError(f"unknown example id {example_id!r} in {self.path}") from None

    def add_vote(self, example_id: str, rater: str, vote: Any, *, save: bool = True) -> None:
        """Record (or replace) `rater`'s vote and save the store at once."""
        rater = check_rater(rater)
        self.get(example_id).votes[rater] = check_vote(vote)
        if save:
            self.save()

    def next_for(self, rater: str) -> Example | None:
        """First example `rater` has not voted on (None when done)."""
        return next((e for e in self.examples if rater not in e.votes), None)

    def progress(self, rater: str) -> tuple[int, int]:
        return sum(rater in e.votes for e in self.examples), len(self.examples)

    def raters(self) -> list[str]:
        return sorted({r for e in self.examples for r in e.votes}, key=_rater_key)

    def vote_matrix(self) -> tuple[np.ndarray, list[str]]:
        """(N, R) votes with -1 for missing, and the rater names."""
        raters = self.raters()
        m = np.full((len(self.examples), len(raters)), NO_LABEL, dtype=np.int64)
        for i, e in enumerate(self.examples):
            for j, r in enumerate(raters):
                m[i, j] = e.votes.get(r, NO_LABEL)
        return m, raters

    def to_invariance_set(self, policy: TiePolicy | None = None):
        """The store as an InvarianceSet: images in [0, 1], labels side by side, every vote.

        Human labels follow `policy` (default: the store's); ties that the policy leaves open
        and "not a digit" majorities become -1 (unknown).
        """
        if not self.examples:
            raise DataError(f"{self.path}: the label store is empty")
        splits = {e.source_split for e in self.examples}
        if len(splits) != 1:
            raise DataError(
                f"{self.path}: examples come from several MNIST splits {sorted(splits)}"
            )
        human, _ = self.labels(policy)
        human = np.where((human >= 0) & (human <= 9), human, NO_LABEL)
        votes, _ = self.vote_matrix()
        eps = {e.eps for e in self.examples}
        return InvarianceSet(
            name=self.name or self.path.stem,
            images=np.stack([e.image for e in self.examples]).astype(np.float32)[..., None],
            original_label=np.array([e.original_label for e in self.examples], dtype=np.int64),
            target_label=np.array([e.target_label for e in self.examples], dtype=np.int64),
            human_label=human.astype(np.int64),
            source_split=splits.pop(),
            source_index=np.array([e.source_index for e in self.examples], dtype=np.int64),
            eps=eps.pop() if len(eps) == 1 else float("nan"),
            norm=self.examples[0].norm,
            votes=votes if votes.size else None,
        )

    def labels(self, policy: TiePolicy | None = None) -> tuple[np.ndarray, list[str]]:
        """Human labels and statuses under `policy` (default: the store's)."""
        pol = check_tie_policy(policy or self.tie_policy)
        res = [e.resolved(pol) for e in self.examples]
        return np.array([r[0] for r in res], dtype=np.int64), [r[1] for r in res]


def check_rater(rater: str) -> str:
    r = str(rater).strip()
    if not r or len(r) > 64 or not all(ch.isalnum() or ch in "-_." for ch in r):
        raise ConfigError(
            f"rater name {rater!r} is invalid; use 1-64 letters, digits, '-', '_' or '.'"
        )
    return r


def _rater_key(name: str) -> tuple[int, Any]:
    head, _, num = name.rpartition("_")
    return (0, (head, int(num))) if num.isdigit() else (1, name)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _example_from_json(r: dict[str, Any]) -> Example:
    votes = {
        check_rater(k): check_vote(v, f"vote of {k} on example {r['id']}")
        for k, v in r["votes"].items()
    }
    split, index, original = (
        str(r["source_split"]),
        int(r["source_index"]),
        int(r["original_label"]),
    )
    size = {"train": 60_000, "test": 10_000}.get(split)
    if size is None or not 0 <= index < size:
        raise ValueError(f"example {r['id']}: source {split}[{index}] is not an MNIST image")
    if not 0 <= original <= 9:
        raise ValueError(f"example {r['id']}: original_label {original} is not in 0..9")
    return Example(
        id=str(r["id"]),
        source_split=split,
        source_index=index,
        eps=float(r["eps"]),
        norm=str(r["norm"]),
        original_label=int(r["original_label"]),
        target_label=int(r["target_label"]),
        image=decode_image(r["image"]),
        published_label=int(r.get("published_label", NO_LABEL)),
        votes=votes,
        **{k: int(r[k]) for k in CANDIDATE_FIELDS if r.get(k) is not None},
    )


# ---- importers -----------------------------------------------------------------------------
def store_from_arrays(
    path: str | os.PathLike,
    images: np.ndarray,
    *,
    source_split: np.ndarray | str,
    source_index: np.ndarray,
    original_label: np.ndarray,
    target_label: np.ndarray,
    eps: np.ndarray | float,
    norm: str,
    name: str = "",
    prefix: str = "",
    published_label: np.ndarray | None = None,
    tie_policy: TiePolicy = "flag",
) -> LabelStore:
    """A new store from arrays (images float32 (N, 28, 28[, 1]) in [0, 1])."""
    x = np.asarray(images, dtype=np.float32)
    n = x.shape[0]
    x = x.reshape(n, 28, 28)
    split = np.broadcast_to(np.asarray(source_split), (n,))
    eps_a = np.broadcast_to(np.asarray(eps, dtype=np.float64), (n,))
    pub = np.full(n, NO_LABEL) if published_label is None else np.asarray(published_label)
    examples = [
        Example(
            id=f"{prefix}{i}",
            source_split=str(split[i]),
            source_index=int(source_index[i]),
            eps=float(eps_a[i]),
            norm=norm,
            original_label=int(original_label[i]),
            target_label=int(target_label[i]),
            image=x[i],
            published_label=int(pub[i]),
        )
        for i in range(n)
    ]
    return LabelStore(path, examples, name=name, tie_policy=tie_policy)


def store_from_candidates(
    path: str | os.PathLike, npz_path: str | os.PathLike, tie_policy: TiePolicy = "flag"
) -> LabelStore:
    """A new, unlabelled store from a `candidates.npz` written by `robustlab generate`."""
    p = Path(npz_path)
    keys = ("images", "source_split", "source_index", "original_label", "target_label", "eps")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in keys}
            norm = str(z["norm"]) if "norm" in z.files else "linf"
            extra = {k: z[k] for k in CANDIDATE_FIELDS if k in z.files}
    except FileNotFoundError:
        raise DataError(f"{p}: candidates file not found") from None
    except KeyError as exc:
        raise DataError(
            f"{p}: not a candidates file (missing array {exc}); use `robustlab generate` output"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: not a readable .npz file ({exc})") from None
    x = arrays["images"]
    if (
        x.ndim != 3
        or x.shape[1:] != (28, 28)
        or not np.isfinite(x).all()
        or x.min() < 0
        or x.max() > 1
    ):
        raise DataError(f"{p}: images must be float (N, 28, 28) in [0, 1]")
    for k, v in extra.items():
        if v.shape != (len(x),) or not np.issubdtype(v.dtype, np.integer):
            raise DataError(f"{p}: {k} must be {len(x)} integers, got {v.dtype} {v.shape}")
    rank = extra.get("rank")  # L0: several candidates per source image, told apart by rank
    ids = [
        f"{s}{i}-l0-{rank[n]}" if rank is not None else f"{s}{i}-eps{e:g}"
        for n, (s, i, e) in enumerate(
            zip(arrays["source_split"], arrays["source_index"], arrays["eps"], strict=True)
        )
    ]
    store = store_from_arrays(
        path, x, **{k: arrays[k] for k in keys[1:]}, norm=norm, name=p.stem, tie_policy=tie_policy
    )
    for n, (e, new_id) in enumerate(zip(store.examples, ids, strict=True)):
        e.id = new_id
        for k, values in extra.items():
            setattr(e, k, int(values[n]))
    return LabelStore(path, store.examples, name=p.stem, tie_policy=tie_policy)


def import_thesis(
    path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    tie_policy: TiePolicy = "flag",
) -> LabelStore:
    """The thesis eps 0.3 set with every rater's vote from rater_votes.csv."""
    s = load_thesis_set(0.3, data_dir)
    table = read_rater_votes(_thesis_folder(data_dir) / "rater_votes.csv")
    store = store_from_set(path, s, prefix="thesis-eps0.3-", tie_policy=tie_policy)
    for e, row in zip(store.examples, table["votes"], strict=True):
        e.votes = {str(r): int(v) for r, v in zip(table["raters"], row, strict=True) if v >= 0}
    return store


def import_tramer(
    path: str | os.PathLike,
    name: str,
    data_dir: str | os.PathLike | None = None,
    tie_policy: TiePolicy = "flag",
) -> LabelStore:
    """A Tramèr et al. set: published human labels, no per-rater votes."""
    s = load_tramer_set(name, data_dir)
    return store_from_set(
        path, s, prefix=f"{name}-", published_label=s.human_label, tie_policy=tie_policy
    )


def store_from_set(
    path: str | os.PathLike,
    s,
    *,
    prefix: str,
    published_label: np.ndarray | None = None,
    tie_policy: TiePolicy = "flag",
) -> LabelStore:
    """A new store holding the examples of an InvarianceSet (no votes yet)."""
    return store_from_arrays(
        path,
        s.images,
        source_split=s.source_split,
        source_index=s.source_index,
        original_label=s.original_label,
        target_label=s.target_label,
        eps=s.eps,
        norm=s.norm,
        name=s.name,
        prefix=prefix,
        published_label=published_label,
        tie_policy=tie_policy,
    )


def _thesis_folder(data_dir: str | os.PathLike | None) -> Path:
    return invariance_root(data_dir) / "thesis" / "eps0.3"


# ---- agreement -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Agreement:
    n_examples: int  # examples with at least two votes
    unanimity: float  # share of those where every vote agrees
    fleiss_kappa: float
    per_rater: dict[str, float]  # share of a rater's votes equal to the others' majority
    ties: int  # examples whose most-voted answer is tied


def fleiss_kappa(votes: np.ndarray, n_categories: int = NOT_A_DIGIT + 1) -> float:
    """Fleiss' κ for an (N, R) vote matrix (-1 = missing; raters per item may vary).

    Per-item agreement P_i = (Σ_j n_ij² − n_i) / (n_i (n_i − 1)); chance agreement from the
    pooled category shares; items with fewer than two votes are ignored.
    """
    counts = np.stack([(votes == c).sum(axis=1) for c in range(n_categories)], axis=1)
    n_i = counts.sum(axis=1)
    keep = n_i >= 2
    counts, n_i = counts[keep], n_i[keep]
    if not len(n_i):
        raise DataError("Fleiss' kappa needs examples with at least two votes")
    p_i = ((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_j = counts.sum(axis=0) / n_i.sum()
    p_e = float((p_j**2).sum())
    return float((p_i.mean() - p_e) / (1 - p_e)) if p_e < 1 else 1.0


def agreement(votes: np.ndarray, raters: list[str]) -> Agreement:
    """Unanimity share, Fleiss' κ and per-rater agreement with the leave-one-out majority.

    A rater's agreement is the share of their votes equal to the unique most-voted answer of
    the *other* raters on that example (examples where the others tie are skipped).
    """
    n_votes = (votes >= 0).sum(axis=1)
    multi = n_votes >= 2
    unanimous = [len(set(v[v >= 0].tolist())) == 1 for v in votes[multi]]
    ties = 0
    for v in votes:
        c = np.bincount(v[v >= 0], minlength=NOT_A_DIGIT + 1)
        ties += int(c.max() > 0 and (c == c.max()).sum() > 1)
    per: dict[str, float] = {}
    for j, r in enumerate(raters):
        agree = total = 0
        for v in votes:
            if v[j] < 0:
                continue
            others = np.delete(v, j)
            c = np.bincount(others[others >= 0], minlength=NOT_A_DIGIT + 1)
            if c.max() == 0 or (c == c.max()).sum() > 1:
                continue
            total += 1
            agree += int(np.argmax(c) == v[j])
        per[r] = agree / total if total else float("nan")
    return Agreement(
        int(multi.sum()),
        float(np.mean(unanimous)) if unanimous else float("nan"),
        fleiss_kappa(votes),
        per,
        ties,
    )


@dataclass(frozen=True)
class PolicyDiff:
    example: str
    votes: list[int]
    original_label: int
    published: int
    resolved: int
    status: str


def published_vs_policy(
    store: LabelStore, published: np.ndarray, policy: TiePolicy
) -> list[PolicyDiff]:
    """Examples where a published majority differs from the label under `policy`."""
    out = []
    for e, pub in zip(store.examples, published, strict=True):
        label, status = e.resolved(policy)
        if label != int(pub):
            out.append(
                PolicyDiff(e.id, list(e.votes.values()), e.original_label, int(pub), label, status)
            )
    return out
