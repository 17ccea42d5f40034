"""Model registry: architectures by name (`registry`), the built-in ones in `cnn` and `small_cnn`."""

from robustlab.models import cnn as _builtin  # noqa: F401  (registers the built-in architectures)
from robustlab.models import small_cnn as _small  # noqa: F401
from robustlab.models.registry import available_models, build_model, register_model

__all__ = ["available_models", "build_model", "register_model"]
