"""``qeeps-view``: an HTML page of a results file's queries and their top-k matches.

::

    qeeps-view --results R.json[.gz] [--results R2.json.gz --labels OIM,QEEPS]
               [--dataset NAME|FILE.json] [--gallery-size 100] [--cross-camera]
               [--det-thresh 0.5]
               [--topk 5] [--worst N | --sample N [--seed S] | --queries 0,5,17 | --all]
               --output DIR

Writes ``DIR/index.html`` (a metric line per results file, a table of every query sortable by
clicking its headers, and the chosen queries rendered: the query person and its top-k matches,
green when right, red when wrong, with similarity and detection score), the rendered images in
``DIR/images/`` (JPEG, linked relative to the page: the folder can be zipped) and the table as
``DIR/queries.json``. Without a choice of queries, 20 are sampled (seed 0). ``--dataset`` is
the results file's data set by default; a custom data set file (``.json`` / ``.json.gz``,
:mod:`qeeps_d2.data.datasets.custom`) is registered under the name it holds, as ``qeeps-eval``
does. The page's mAP and
top-k are what ``qeeps-eval`` prints for the same file and protocol. User errors (unreadable or
malformed results, results of another data set or protocol, a query index not in the results,
the data set's images folder missing) print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from ..data.datasets.builtin import register_person_search_file
from ..data.datasets.custom import is_person_search_path
from ..utils.cli import ArgumentParser, UsageError, add_protocol_arguments, run_cli
from .report import build_viewer
from .selection import QuerySelection, parse_query_list

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qeeps-view",
                       description="HTML viewer of a person-search results file: per-query "
                                   "top-k matches and metrics.")
    p.add_argument("--results", action="append", required=True, metavar="R",
                   help="results file (.json or .json.gz); repeat to compare models")
    p.add_argument("--labels", help="comma-separated names of the results files (e.g. OIM,QEEPS)")
    add_protocol_arguments(p)
    p.add_argument("--topk", type=int, default=5, help="matches shown per query (default 5)")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--worst", type=int, metavar="N", help="the N queries of lowest AP")
    choice.add_argument("--sample", type=int, metavar="N",
                        help="N random queries (default: 20, seed 0)")
    choice.add_argument("--queries", metavar="LIST", help="these query indices, e.g. 0,5,17")
    choice.add_argument("--all", action="store_true", help="every query")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    p.add_argument("--output", required=True, metavar="DIR", help="the page's folder")
    p.add_argument("--title", help="page title")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _run(args) -> List[str]:
    labels = None
    if args.labels is not None:
        labels = [x.strip() for x in args.labels.split(",")]
        if len(labels) != len(args.results):
            raise UsageError(f"--labels names {len(labels)} models for {len(args.results)} "
                             "--results files")
    if args.topk < 1:
        raise UsageError(f"--topk must be at least 1, got {args.topk}")
    selection = QuerySelection(
        queries=parse_query_list(args.queries) if args.queries is not None else None,
        sample=args.sample, seed=args.seed, worst=args.worst, all=args.all)
    dataset = args.dataset
    if dataset is not None and is_person_search_path(dataset):
        dataset = register_person_search_file(dataset)
    report = build_viewer(
        args.results, args.output, labels=labels, dataset=dataset,
        gallery_size=args.gallery_size, cross_camera=args.cross_camera,
        det_thresh=args.det_thresh, topk=args.topk, selection=selection, title=args.title,
        table_json=os.path.join(args.output, "queries.json"), progress=not args.no_progress)
    lines = []
    for m in report.models:
        s = m.scores.summary()
        lines.append(f"{m.label + ': ' if m.label else ''}mAP {100 * s['mAP']:.2f}%, top-1 "
                     f"{100 * s['top1']:.2f}% over {s['num_queries']} queries ({m.path})")
    lines.append(f"{len(report.rendered)} of {len(report.table)} queries rendered "
                 f"({report.protocol.name}): {report.page}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``qeeps-view``; returns the exit status (0 ok, 2 user error)."""
    return run_cli("qeeps-view", _parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
