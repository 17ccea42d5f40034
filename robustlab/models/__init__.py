"""Model registry: architectures by name (`registry`), the built-in ones in `cnn`."""

from robustlab.models import cnn as _builtin  # noqa: F401  (registers the built-in architectures)
from robustlab.models.registry import available_models, build_model, register_model

__all__ = ["available_models", "build_model", "register_model"]
