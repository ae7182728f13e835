"""User-facing error types: every bad input ends as ``clsim: error: <key or file>: <reason>`` and exit code 2.

:class:`ClsimError` is the one base the command line catches. Each subclass also derives from the builtin exception a
caller would expect (``ValueError`` for bad values, ``FileNotFoundError`` for missing data, ...), so library users
can keep catching those. Messages are one line, name the key or the file, and say what to do instead.
"""

from __future__ import annotations

__all__ = [
    "ClsimError",
    "ConfigError",
    "DataError",
    "MissingDatasetError",
    "BackboneError",
    "NumericalError",
    "RunFolderError",
]


class ClsimError(Exception):
    """Base of every error caused by the user's input or environment (exit code 2 in the CLI, no traceback)."""


class ConfigError(ClsimError, ValueError):
    """A configuration problem; ``str(err)`` is one line naming the key and the valid choices."""


class DataError(ClsimError, ValueError):
    """Bad data: an image that cannot be decoded, a split that leaves a task or class without images, ..."""


class MissingDatasetError(DataError, FileNotFoundError):
    """A dataset root lacks the expected files. The message names the paths tried and how to obtain the data."""


class BackboneError(ClsimError, RuntimeError):
    """A backbone could not be created or its weights could not be loaded; one line saying what to do."""


class NumericalError(ClsimError, FloatingPointError):
    """Non-finite values (or a blow-up past a threshold) in a loss, parameters or predictions."""


class RunFolderError(ClsimError, RuntimeError):
    """A run folder cannot be used: locked by another run, written by another config, outside ``out``..."""
