"""Thin command-line entry points over the library (one module per command group)."""
