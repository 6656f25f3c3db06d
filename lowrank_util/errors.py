"""Errors that are the user's to fix, told apart from bugs.

A ``UserError`` is a mistake in what someone gave us (an option value, a name, a file, a download that
did not happen); its message names the thing and the fix, and a command line prints it as one line
(``lowrank_util.cli``). Anything else that escapes is a bug and keeps its traceback. Each type also
derives from the built-in exception a caller of the library would expect, so ``except ValueError``
and ``except FileNotFoundError`` keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the input, to be reported in one line."""


class ConfigError(UserError, ValueError):
    """A bad option value or an unknown name (data set, method, encoder, fill, …)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named, or that a step needs, does not exist."""


class CorruptFileError(UserError, ValueError):
    """A file that exists but cannot be read back whole (truncated, overwritten, not the expected format)."""


class MismatchError(UserError, ValueError):
    """A readable file that does not fit what it is loaded into (keys, shapes, another base model)."""


class DownloadError(UserError, RuntimeError):
    """A file could not be fetched; the message says where to put it by hand."""


class UnknownNameError(ConfigError, KeyError):
    """A name missing from a registry (data sets, encoders, methods); also the KeyError of a failed lookup."""

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0]) if self.args else ""
