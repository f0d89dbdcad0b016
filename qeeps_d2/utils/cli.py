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

__all__ = ["UsageError", "ArgumentParser", "add_model_arguments", "add_output_argument",
           "add_protocol_arguments",
           "model_opts", "run_cli", "report_user_error", "exit_on_user_error"]


class UsageError(Exception):
    """A command-line mistake (reported in one line, exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that raises :class:`UsageError` instead of exiting."""

    def error(self, message):
        raise UsageError(message)


def add_model_arguments(parser: argparse.ArgumentParser, weights: bool = True,
                        confidence: bool = True, device: bool = True,
                        opts: bool = True) -> argparse.ArgumentParser:
    """The model flags every tool shares, named as in Detectron2's ``demo/demo.py``:
    ``--config-file`` (``--config`` kept as an alias; ``args.config_file``), ``--weights``,
    ``--confidence-threshold`` (sets ``TEST.PERSON_SEARCH.DET_THRESH``), ``--device`` and
    ``--opts KEY VALUE ...`` (config overrides; last on the command line). Read them back with
    :func:`model_opts`."""
    parser.add_argument("--config-file", "--config", dest="config_file", required=True,
                        metavar="FILE", help="the model's config file (YAML)")
    if weights:
        parser.add_argument("--weights", required=True, metavar="FILE",
                            help="the trained model's weights (.pth/.pkl)")
    if confidence:
        parser.add_argument("--confidence-threshold", type=float, default=None, metavar="T",
                            help="keep detections scoring at least T (default: the config's "
                                 "TEST.PERSON_SEARCH.DET_THRESH)")
    if device:
        parser.add_argument("--device", default=None,
                            help="cpu, cuda or cuda:N (default: cuda if any)")
    if opts:
        parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                            help="config overrides as KEY VALUE pairs, last on the command line")
    return parser


def model_opts(args: argparse.Namespace) -> List[str]:
    """The config overrides of :func:`add_model_arguments`' flags: ``--opts`` and, when given,
    ``--confidence-threshold`` as ``TEST.PERSON_SEARCH.DET_THRESH`` (after ``--opts``: the
    explicit flag wins)."""
    out = list(getattr(args, "opts", None) or [])
    if len(out) % 2:
        raise UsageError(f"--opts takes KEY VALUE pairs; got an odd number of items: {out}")
    threshold = getattr(args, "confidence_threshold", None)
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise UsageError(f"--confidence-threshold must be in [0, 1], got {threshold}")
        out += ["TEST.PERSON_SEARCH.DET_THRESH", str(threshold)]
    return out


def add_output_argument(parser: argparse.ArgumentParser, default: Optional[str],
                        help: str = "output folder") -> argparse.ArgumentParser:
    """``--output`` (``--out`` kept as an alias; ``args.output``), as Detectron2's tools name it."""
    parser.add_argument("--output", "--out", dest="output", default=default, metavar="PATH",
                        help=help + (f" (default {default})" if default else ""))
    return parser


def add_protocol_arguments(parser: argparse.ArgumentParser, dataset_required: bool = False,
                           det_thresh: Optional[float] = 0.5, det_thresh_help: str = "",
                           scope: str = "", builtin_sets: Sequence[str] = ()
                           ) -> argparse.ArgumentParser:
    """The search-protocol flags of the tools that read results files (``qeeps-eval``,
    ``qeeps-view``, ``qeeps-convert-results``): ``--dataset NAME|FILE.json`` (required, or
    default the results file's data set), ``--gallery-size``, ``--cross-camera`` and
    ``--det-thresh`` (default ``det_thresh``). ``scope`` prefixes the protocol flags' help (e.g.
    ``"--topk protocol: "``); ``builtin_sets`` are listed in ``--dataset``'s help."""
    listed = f" (built in: {', '.join(builtin_sets)})" if builtin_sets else ""
    parser.add_argument(
        "--dataset", required=dataset_required, metavar="NAME|FILE.json",
        help=f"registered test set{listed} or a custom data set file (.json / .json.gz)"
             + ("" if dataset_required else "; default: the results file's data set"))
    parser.add_argument("--gallery-size", type=int, default=100,
                        help=f"{scope}CUHK-SYSU style sets: 50, 100, 500, 1000, 2000, 4000 or "
                             "-1 (whole pool); default 100")
    parser.add_argument("--cross-camera", action="store_true",
                        help=f"{scope}PRW (and custom sets with camera ids): search only frames "
                             "of other cameras than the query's")
    parser.add_argument("--det-thresh", type=float, default=det_thresh,
                        help=det_thresh_help or "detections with det_score >= this are ranked "
                                                f"(default {det_thresh})")
    return parser


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
