"""One error path for every command line of the project: a ``UserError`` becomes one line on stderr,
``error: …``, and exit status 2 (as argparse does for a bad option); any other exception is a bug and
keeps its traceback. ``LOWRANK_DEBUG=1`` (or ``--debug`` where a command has it) shows the traceback
of user errors too."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from lowrank_util.errors import ConfigError, UserError

T = TypeVar("T")
DEBUG_VARIABLE = "LOWRANK_DEBUG"  # set to 1: user errors raise with their traceback
USAGE_STATUS = 2  # argparse's exit status for a bad command line; ours for every user error


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise ConfigError, so that a bad option is reported like every other user
    error: one line naming the problem (argparse itself would print the usage block first)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def debugging(argv: list[str] | None = None) -> bool:
    """True if tracebacks of user errors are wanted: --debug in ``argv`` or LOWRANK_DEBUG set (not 0)."""
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0")


def run_command(main: Callable[[list[str] | None], T], argv: list[str] | None = None) -> T:
    """``main(argv)``; a UserError is printed as ``error: …`` on stderr and exits with status 2."""
    try:
        return main(argv)
    except UserError as error:
        if debugging(argv):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_STATUS) from None
