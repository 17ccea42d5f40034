"""Human votes on invariance examples: a vote's checks and the explicit tie policy.

A vote is an integer 0..9 (the digit a rater saw) or 10 (:data:`NOT_A_DIGIT`, "X"). The human
label of an example is its unique most-voted answer; a tie is resolved by the policy: ``drop``
(no label, the example is dropped), ``original`` (the source's label) or ``flag`` (no label,
needs more votes). With no votes, a published label (Tramèr sets) is used, else none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

import numpy as np

from robustlab.errors import ConfigError, DataError

NOT_A_DIGIT = 10  # the vote "this is not a digit"
NO_LABEL = -1
TiePolicy = Literal["drop", "original", "flag"]
TIE_POLICIES: tuple[str, ...] = get_args(TiePolicy)


def check_vote(vote: Any, what: str = "vote") -> int:
    """A vote as int 0..10; "X"/"x" means not a digit. Anything else raises DataError."""
    if isinstance(vote, str) and vote.strip().upper() == "X":
        return NOT_A_DIGIT
    if isinstance(vote, bool) or not isinstance(vote, (int, np.integer, str)):
        raise DataError(
            f"{what}={vote!r} is not a vote; use a digit 0..9 or 10/'X' for not a digit"
        )
    try:
        v = int(vote)
    except ValueError:
        raise DataError(
            f"{what}={vote!r} is not a vote; use a digit 0..9 or 10/'X' for not a digit"
        ) from None
    if not 0 <= v <= NOT_A_DIGIT:
        raise DataError(f"{what}={v} is outside 0..9; use a digit 0..9 or 10/'X' for not a digit")
    return v


def check_tie_policy(policy: str) -> TiePolicy:
    if policy not in TIE_POLICIES:
        raise ConfigError(f"unknown tie policy {policy!r}; choose one of {', '.join(TIE_POLICIES)}")
    return policy  # type: ignore[return-value]


def resolve(
    votes: Iterable[int], original: int, policy: TiePolicy, published: int = NO_LABEL
) -> tuple[int, str]:
    """(human label, status) from the votes under `policy`; see the module docstring."""
    vs = [int(v) for v in votes if int(v) >= 0]
    if not vs:
        return (published, "published") if published >= 0 else (NO_LABEL, "unlabelled")
    counts = np.bincount(vs, minlength=NOT_A_DIGIT + 1)
    top = np.flatnonzero(counts == counts.max())
    if top.size == 1:
        return int(top[0]), "labelled"
    if policy == "original":
        return int(original), "tie-original"
    return NO_LABEL, "dropped" if policy == "drop" else "flagged"


def spreadsheet_mode(votes: Iterable[int]) -> int:
    """Most frequent vote, ties broken by first occurrence (a spreadsheet MODE)."""
    vs = [int(v) for v in votes if int(v) >= 0]
    if not vs:
        return NO_LABEL
    counts = {v: vs.count(v) for v in vs}
    best = max(counts.values())
    return next(v for v in vs if counts[v] == best)
