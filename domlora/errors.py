"""User-facing errors: each names the problem and the fix."""
from __future__ import annotations


class DomloraError(Exception):
    """An error caused by input the user can fix; the message says how.

    Entry points print the message (no traceback) and exit with status 2.
    """


class ConfigError(DomloraError, ValueError):
    """A bad parameter or configuration value."""


class DataError(DomloraError, ValueError):
    """Malformed or unusable samples."""


class ModelError(DomloraError):
    """A model that cannot be loaded or has no usable modules."""
