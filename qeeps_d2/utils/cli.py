"""What the console scripts share: one-line user errors with exit status 2.

The command-line entry points (``qeeps-eval``, ``qeeps-search``, ``qeeps-synthps`` and
``projects/QEEPS/train_net.py``) report a user's mistake (a missing or malformed file, an unknown
config key or data set, a bad option) as one line ``<prog>: error: <message naming the input>``
on stderr, without a traceback, and exit with status 2. Errors that are not the user's (bugs)
keep their traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional, Sequence, Tuple, Type, TypeVar

T = TypeVar("T")

__all__ = ["UsageError", "ArgumentParser", "run_cli", "report_user_error", "exit_on_user_error"]


class UsageError(Exception):
    """A command-line mistake (reported in one line, exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that raises :class:`UsageError` instead of exiting."""

    def error(self, message):
        raise UsageError(message)


def run_cli(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], List[str]],
            argv: Optional[Sequence[str]] = None,
            user_errors: Tuple[Type[BaseException], ...] = (ValueError, OSError)) -> int:
    """Parse ``argv``, call ``run(args)`` and print the lines it returns (exit status 0).

    A :class:`UsageError` or one of ``user_errors`` is the user's input being wrong: one line
    ``<prog>: error: <message>`` on stderr, no traceback, exit status 2.
    """
    try:
        lines = run(parser.parse_args(argv))
    except (UsageError, *user_errors) as e:
        return report_user_error(prog, e)
    print("\n".join(lines))
    return 0


def report_user_error(prog: str, error: BaseException) -> int:
    """Print ``<prog>: error: <message>`` (whitespace collapsed to one line) on stderr; returns 2,
    the exit status of a user error."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def exit_on_user_error(prog: str, check: Callable[..., T], *args,
                       user_errors: Tuple[Type[BaseException], ...] = (ValueError, OSError)) -> T:
    """Return ``check(*args)``; if it raises a :class:`UsageError` or one of ``user_errors``,
    report it in one line (:func:`report_user_error`) and exit with status 2."""
    try:
        return check(*args)
    except (UsageError, *user_errors) as e:
        sys.exit(report_user_error(prog, e))
