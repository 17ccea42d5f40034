"""Thin command-line entry points over the library (one module per command group)."""

import argparse
from typing import Any

# what `ArgumentParser.add_subparsers()` returns (argparse names its class privately)
SubParsers = Any


def optional(text: str) -> str | None:
    """argparse type: an empty string (MLflow's empty parameter) means 'not given'."""
    return text or None


def flag(text: str) -> bool:
    """argparse type: true/false (1/0, yes/no, on/off); an empty string means false."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
