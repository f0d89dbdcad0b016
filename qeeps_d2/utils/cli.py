"""What the console scripts share: one-line user errors with exit status 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional, Sequence, Tuple, Type

__all__ = ["UsageError", "ArgumentParser", "run_cli"]


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
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
