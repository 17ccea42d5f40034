"""Thin command-line entry points over the library (one module per command group)."""


def optional(text: str) -> str | None:
    """argparse type: an empty string (MLflow's empty parameter) means 'not given'."""
    return text or None
