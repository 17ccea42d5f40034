"""User-facing errors: one line that names the problem and the fix."""


class RobustlabError(Exception):
    """An error caused by the user's input or environment; printed as one line, exit code 2."""


class DataError(RobustlabError):
    """A dataset file is missing, corrupt, or not what it declares to be."""


class ConfigError(RobustlabError):
    """A parameter value is out of range or inconsistent."""


class SecretError(ConfigError):
    """A secret where anyone may read it (a password on a command line or in a parameter)."""


class TrackingError(RobustlabError):
    """The MLflow tracking store or server cannot be used."""
