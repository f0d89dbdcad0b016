"""``qeeps-eval``: score a person-search results file against a registered data set's protocol.

::

    qeeps-eval --dataset NAME|FILE.json [--gallery-size N] [--cross-camera] [--det-thresh 0.5]
               [--json] RESULTS

``--dataset`` names a registered test set, or is a custom data set file (``.json`` /
``.json.gz``, :mod:`qeeps_d2.data.datasets.custom`), registered under the name it holds.

Prints mAP, top-1/5/10 and the number of queries (and detection AP / recall when the file holds
query-independent ``gallery_detections``). A file covering only some queries is scored on those
and labelled ``partial: K of N queries``; a file written with ground-truth boxes
(``"gt_boxes": true``, TEST.PERSON_SEARCH.USE_GT_BOXES) is labelled so. ``--json`` makes the last
line one JSON object ``{"mAP", "top1", "top5", "top10", "num_queries", "gt_boxes", ...}`` with
fractions in [0, 1].
User errors (missing or malformed files, unknown data set, bad options) print one line on stderr
and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence

from ..data.datasets.builtin import register_person_search_file
from ..data.datasets.catalog import (
    DATASET_NAMES,
    is_registered,
    is_test_set,
    load_dataset_dicts,
    load_protocol,
    protocol_info,
    test_set_names,
)
from ..data.datasets.custom import is_person_search_path
from ..data.dataset_dicts import detection_ground_truth
from ..data.search_protocol import SearchProtocol
from .detection_metrics import evaluate_detections
from .results_file import SearchResults, read_results, validate_against_protocol
from .search_metrics import TOP_K, SearchScores, score_search
from ..utils.cli import ArgumentParser, UsageError, add_protocol_arguments, run_cli

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qeeps-eval",
                description="Score a person-search results file against a data set's protocol.")
    p.add_argument("results", metavar="RESULTS", help="results file (.json or .json.gz)")
    add_protocol_arguments(p, dataset_required=True, builtin_sets=[
        n for n in DATASET_NAMES if is_test_set(n)])
    p.add_argument("--json", action="store_true",
                   help="end with one JSON line of the metrics (fractions in [0, 1])")
    return p


def _test_set(text: str) -> str:
    """The test set ``--dataset`` names: a registered name, or the name held by a custom data
    set file (registered here)."""
    if is_person_search_path(text):
        return register_person_search_file(text)
    if not is_registered(text) or not is_test_set(text):
        what = (f"{text} is a training set (no search protocol)" if is_registered(text)
                else f"unknown test set {text!r}")
        raise UsageError(f"--dataset: {what}; registered test sets: "
                         f"{', '.join(test_set_names())}; or give a custom data set file "
                         "(.json / .json.gz)")
    return text


def _setting(dataset: str, protocol: SearchProtocol) -> str:
    if protocol_info(dataset)["gallery_sizes"]:
        size = protocol.name.rpartition("/G")[2]
        return "gallery size: whole pool" if size == "-1" else f"gallery size {size}"
    return "cross-camera protocol" if protocol.name.endswith("/cross_camera") \
        else "standard protocol"


def _detection_metrics(
    results: SearchResults, protocol: SearchProtocol, scores: SearchScores, det_thresh: float
) -> Dict[str, float]:
    wanted = set(protocol.gallery_images(scores.query_indices.tolist()))
    ground_truth = detection_ground_truth(load_dataset_dicts(results.dataset), wanted)
    stray = sorted(set(results.gallery_detections) - wanted)
    if stray:
        raise ValueError(
            f"gallery_detections holds image {stray[0]!r}, not a gallery image of the scored "
            "queries"
        )
    return evaluate_detections(ground_truth, results.gallery_detections, det_thresh)


def _run(args) -> List[str]:
    if args.det_thresh < 0:
        raise UsageError(f"--det-thresh must be >= 0, got {args.det_thresh}")
    dataset = _test_set(args.dataset)
    results = read_results(args.results)
    min_score = results.extra.get("min_det_score")
    if isinstance(min_score, (int, float)) and args.det_thresh < min_score:
        raise ValueError(
            f"{args.results} only holds detections with det_score >= {min_score}; "
            f"--det-thresh {args.det_thresh} cannot be evaluated from it"
        )
    protocol = load_protocol(dataset, args.gallery_size, args.cross_camera)
    validate_against_protocol(results, protocol, args.results)
    scores = score_search(protocol, results.detections_by_query(), args.det_thresh)
    n, total = len(scores), len(protocol)
    summary = scores.summary()
    summary.update(dataset=dataset, protocol=protocol.name, det_thresh=args.det_thresh,
                   partial=n < total, num_queries_total=total)

    gt_boxes = results.extra.get("gt_boxes") is True
    summary["gt_boxes"] = gt_boxes
    lines = [f"Person search on {dataset} ({_setting(dataset, protocol)}), det_thresh "
             f"{args.det_thresh:g}"
             + (", with ground-truth boxes (re-identification alone)" if gt_boxes else "")]
    partial = f"  (partial: {n} of {total} queries)" if n < total else ""
    lines.append(f"  {'queries':<7}{n:7d}{partial}")
    metrics = [("mAP", "mAP")] + [(f"top-{k}", f"top{k}") for k in TOP_K]
    lines += [f"  {label:<7}{100 * summary[key]:7.2f}%" for label, key in metrics]
    if scores.num_without_target:
        lines.append(f"  ({scores.num_without_target} queries have no target in their gallery: "
                     "scored 0)")
    if results.gallery_detections is not None:
        det = _detection_metrics(results, protocol, scores, args.det_thresh)
        summary.update(det_ap=det["ap"], det_recall=det["recall"],
                       det_labeled_recall=det["labeled_recall"])
        lines.append(f"  detection: AP {100 * det['ap']:.2f}%, recall {100 * det['recall']:.2f}%, "
                     f"labeled recall {100 * det['labeled_recall']:.2f}%")
    if args.json:
        lines.append(json.dumps(summary))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``qeeps-eval``; returns the exit status (0 ok, 2 user error)."""
    return run_cli("qeeps-eval", _parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
