"""Thin command-line entry points over the library (one module per command group)."""

import argparse
from typing import Any

# what `ArgumentParser.add_subparsers()` returns (argparse names its class privately)
SubParsers = Any


def optional(text: str) -> str | None:
    """argparse type: an empty string (MLflow's empty parameter) means 'not given'."""
    return text or None


def flag(text: str) -> bool | None:
    """argparse type: `true` or `false` (any case); an empty string (MLflow's empty parameter)
    means "not given" (None: the option's default applies). Anything else is refused."""
    value = text.strip().lower()
    if value == "true":
        return True
    if value == "false":
        return False
    if value == "":
        return None
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
