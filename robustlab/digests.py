"""SHA-256 digests of files, recorded when a folder is written and checked before it is used
(shipped model folders, carried runs, epoch checkpoints)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from robustlab.errors import RobustlabError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path, files: Iterable[Path]) -> dict[str, str]:
    """SHA-256 of each of `files`, by its POSIX path relative to `folder`."""
    return {Path(p).relative_to(folder).as_posix(): sha256(Path(p)) for p in sorted(files)}


def check_digests(folder: Path, recorded: Mapping[str, str], where: str, fix: str) -> None:
    """RobustlabError (one line) naming the first file of `recorded` (relative to `folder`) that
    is missing or whose SHA-256 differs from the one recorded in `where`, with `fix`."""
    for rel, digest in sorted(recorded.items()):
        path = Path(folder) / rel
        if not path.is_file():
            raise RobustlabError(f"{folder}: {rel} is missing; {fix}")
        if sha256(path) != digest:
            raise RobustlabError(
                f"{folder}: {rel} was altered (SHA-256 differs from the one recorded in "
                f"{where}); {fix}"
            )
