"""User-facing errors: bad input the user can fix. The CLI prints them as one line, no traceback.

A leaf module (imports nothing from the package) so that every stage can raise them.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the offending value or path and says what to do."""


class ConfigError(UserError, ValueError):
    """An unknown config key or an invalid value; raised before any model is built."""


class WeightsError(UserError, RuntimeError):
    """Model weights that cannot be found or loaded (missing file, offline without a cache)."""


class ImageSizeError(UserError, ValueError):
    """An image too small or too thin for the protocol (it would rescale to zero pixels or less than
    a patch): a per-image problem, skipped with the rest under ``on_error=skip``."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named does not exist."""
