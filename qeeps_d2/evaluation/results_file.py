"""The person-search results file (architecture.md 4.3): write, read and validate (numpy only).

::

    {"format": "qeeps-results/1",
     "dataset": "cuhk_sysu_test",
     "queries": [{"index": 0, "image": "s15538.jpg",
                  "gallery": {"s1.jpg": [[x1, y1, x2, y2, det_score, similarity], ...]}}],
     ...}                     # optional extra top-level fields, e.g. "partial": true

Gallery images missing from a query's entry had no detection. The file is JSON, gzip-compressed
when the name ends with ``.json.gz``. Floats are written with Python's shortest round-trip
representation, so reading a file back gives exactly the arrays that were written.

One optional top-level field has a meaning here: ``"gallery_detections"``
(``{image: [[x1, y1, x2, y2, det_score], ...]}``), the query-independent detections of a
query-agnostic model, from which detection AP / recall can be computed. Every other extra field
is kept as is in :attr:`SearchResults.extra`. The evaluator writes ``"mode"`` (``"agnostic"``,
``"pairs"`` or ``"cascade"``); a cascade file also holds ``"cascade_topk"`` (K) and
``"num_pairs"``, and its similarities below -1 are first-stage scores shifted down by 3
(``qeeps_d2.evaluation.cascade``), so similarities are not bounded to [-1, 1].

:func:`read_results` checks the file on its own (format tag, registered data set: built in, or
custom and registered in this process; structure, rows; exact duplicate rows of one gallery
image, which no detector produces and which would count as false positives, are collapsed with
a warning);
:func:`validate_against_protocol` checks it against the protocol it is scored with.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..utils.json_files import load_json_file
from ..data.datasets.catalog import is_registered, registered_names
from ..data.search_protocol import SearchProtocol

logger = logging.getLogger(__name__)

__all__ = [
    "RESULTS_FORMAT",
    "QueryResult",
    "SearchResults",
    "write_results",
    "read_results",
    "validate_against_protocol",
]

RESULTS_FORMAT = "qeeps-results/1"
_RESERVED = ("format", "dataset", "queries", "gallery_detections")


@dataclass
class QueryResult:
    """One query's detections.

    Attributes:
        index: position of the query in the protocol's query list.
        image: the query's image name (a consistency check against the protocol).
        gallery: image name -> (N, 6) float64 rows ``[x1, y1, x2, y2, det_score, similarity]``.
    """

    index: int
    image: str
    gallery: Dict[str, np.ndarray]


@dataclass
class SearchResults:
    """A validated results file.

    Attributes:
        dataset: registered data set name.
        queries: the queries present in the file, in file order (indices are unique).
        gallery_detections: image name -> (N, 5) query-independent detections, or None.
        extra: the other top-level fields (e.g. ``{"partial": True, "mode": "agnostic"}``).
    """

    dataset: str
    queries: List[QueryResult]
    gallery_detections: Optional[Dict[str, np.ndarray]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def detections_by_query(self) -> Dict[int, Dict[str, np.ndarray]]:
        """query index -> gallery detections, the input of ``search_metrics.score_search``."""
        return {q.index: q.gallery for q in self.queries}


QueryLike = Union[QueryResult, Mapping[str, Any]]


def _rows_json(rows: Any) -> List[List[float]]:
    return np.asarray(rows, dtype=np.float64).tolist()


def _query_json(query: QueryLike) -> Dict[str, Any]:
    if isinstance(query, QueryResult):
        index, image, gallery = query.index, query.image, query.gallery
    else:
        index, image, gallery = query["index"], query["image"], query["gallery"]
    return {
        "index": int(index),
        "image": str(image),
        "gallery": {str(name): _rows_json(rows) for name, rows in gallery.items()},
    }


def write_results(
    path: str,
    dataset: str,
    queries: Sequence[QueryLike],
    gallery_detections: Optional[Mapping[str, Any]] = None,
    **extra: Any,
) -> None:
    """Write a results file (``.json`` or ``.json.gz``, chosen by the suffix).

    Args:
        path: output file; parent folders are created.
        dataset: registered data set name.
        queries: :class:`QueryResult` objects or mappings ``{"index", "image", "gallery"}``,
            gallery rows as (N, 6) arrays or nested lists.
        gallery_detections: optional image name -> (N, 5) query-independent detections.
        **extra: further JSON-serialisable top-level fields (``partial=True``, ``mode=...``).
    """
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra fields {clash} would overwrite reserved results-file fields")
    doc: Dict[str, Any] = {"format": RESULTS_FORMAT, "dataset": dataset}
    doc.update(extra)
    doc["queries"] = [_query_json(q) for q in queries]
    if gallery_detections is not None:
        doc["gallery_detections"] = {str(k): _rows_json(v) for k, v in gallery_detections.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    if path.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
            f.write(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def _load_json(path: str) -> Any:
    return load_json_file(path, "results file")


def _parse_rows(path: str, where: str, rows: Any, width: int) -> np.ndarray:
    """(N, width) float64 rows, rejecting anything but finite numbers with x1<=x2, y1<=y2."""
    if not isinstance(rows, list):
        raise ValueError(f"{path}: {where}: rows must be a list, got {type(rows).__name__}")
    try:
        arr = np.asarray(rows)
    except ValueError:
        arr = None  # ragged
    if arr is None or (rows and (arr.ndim != 2 or arr.shape[1] != width)):
        raise ValueError(f"{path}: {where}: every row must hold {width} numbers")
    if rows and arr.dtype.kind not in "iuf":
        raise ValueError(f"{path}: {where}: rows must hold numbers only")
    arr = arr.astype(np.float64).reshape(-1, width)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: {where}: row {int(np.argmax(bad))} holds a non-finite value")
    bad = (arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{path}: {where}: row {i} has x2 < x1 or y2 < y1: {arr[i, :4].tolist()}")
    return arr


def _parse_query(path: str, position: int, q: Any) -> Tuple[QueryResult, int]:
    """One query's entry and the number of duplicate rows dropped from it."""
    where = f"queries[{position}]"
    if not isinstance(q, dict) or not {"index", "image", "gallery"} <= set(q):
        raise ValueError(f"{path}: {where} must be an object with index, image and gallery")
    index, image, gallery = q["index"], q["image"], q["gallery"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"{path}: {where}: index must be a non-negative integer, got {index!r}")
    if not isinstance(image, str) or not image:
        raise ValueError(f"{path}: {where}: image must be a non-empty string, got {image!r}")
    if not isinstance(gallery, dict):
        raise ValueError(f"{path}: {where}: gallery must be an object image -> rows")
    rows, duplicates = _parse_gallery(path, index, gallery)
    return QueryResult(index, image, rows), duplicates


# A fixed random weighting of a row's 6 numbers: equal rows of one image get equal keys, so
# sorting the keys finds duplicate candidates in one pass (then confirmed exactly).
_ROW_KEY_WEIGHTS = np.random.default_rng(0).uniform(0.5, 1.5, 6)


def _duplicate_rows(stacked: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """(N,) bool: rows equal in all 6 numbers to an earlier row of the same image."""
    keys = (stacked * _ROW_KEY_WEIGHTS).sum(axis=1) + image_ids * math.pi
    order = np.argsort(keys, kind="stable")
    if not (keys[order][1:] == keys[order][:-1]).any():
        return np.zeros(len(stacked), dtype=bool)  # the usual case: no candidate
    duplicate = np.zeros(len(stacked), dtype=bool)
    for image in np.unique(image_ids):
        rows = np.flatnonzero(image_ids == image)
        _, first = np.unique(stacked[rows], axis=0, return_index=True)
        duplicate[rows] = True
        duplicate[rows[first]] = False
    return duplicate


def _parse_gallery(path: str, index: int, gallery: Dict[str, Any]
                   ) -> Tuple[Dict[str, np.ndarray], int]:
    """Rows of one query's gallery, checked in one go (image by image only to name an error),
    and the number of exact duplicate rows of an image that were dropped."""
    values = list(gallery.values())
    if values and all(isinstance(rows, list) for rows in values):
        try:
            stacked = _parse_rows(path, f"query {index}", [r for rows in values for r in rows], 6)
        except ValueError:
            stacked = None  # malformed: found and reported image by image below
        if stacked is not None:
            lengths = [len(rows) for rows in values]
            image_ids = np.repeat(np.arange(len(values)), lengths)
            keep = ~_duplicate_rows(stacked, image_ids)
            ends = np.cumsum(lengths).tolist()
            parsed = {n: stacked[e - k : e][keep[e - k : e]]
                      for n, k, e in zip(gallery, lengths, ends)}
            return parsed, int((~keep).sum())
    return {
        name: _parse_rows(path, f"query {index} gallery image {name!r}", rows, 6)
        for name, rows in gallery.items()
    }, 0


def read_results(path: str) -> SearchResults:
    """Read and check a results file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file and the problem: unreadable JSON, missing or wrong
            ``"format"`` tag, unknown data set, malformed query entries, duplicate query
            indices, malformed rows (not 6 finite numbers, x2 < x1 or y2 < y1).

    Exact duplicate rows within one query's gallery image are dropped (one kept) with a
    warning.
    """
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: the results file must hold a JSON object")
    if doc.get("format") != RESULTS_FORMAT:
        raise ValueError(
            f"{path}: format tag must be {RESULTS_FORMAT!r}, got {doc.get('format')!r}"
        )
    dataset = doc.get("dataset")
    if not isinstance(dataset, str) or not is_registered(dataset):
        raise ValueError(
            f"{path}: unknown dataset {dataset!r}; known: {', '.join(registered_names())} (a "
            "custom set must be registered first, e.g. qeeps-eval --dataset its .json file)"
        )
    raw_queries = doc.get("queries")
    if not isinstance(raw_queries, list):
        raise ValueError(f"{path}: 'queries' must be a list")
    parsed = [_parse_query(path, i, q) for i, q in enumerate(raw_queries)]
    queries = [q for q, _ in parsed]
    duplicated = [(q.index, n) for q, n in parsed if n]
    if duplicated:
        logger.warning(
            "%s: %d exact duplicate detection rows (same image, box, score and similarity) "
            "collapsed to one each, in %d queries (first: query %d, %d rows); duplicates would "
            "count as false positives", path, sum(n for _, n in duplicated), len(duplicated),
            *duplicated[0])
    seen = set()
    for q in queries:
        if q.index in seen:
            raise ValueError(f"{path}: query index {q.index} appears more than once")
        seen.add(q.index)

    gallery_detections = None
    if "gallery_detections" in doc:
        raw = doc["gallery_detections"]
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: 'gallery_detections' must be an object image -> rows")
        gallery_detections = {
            name: _parse_rows(path, f"gallery_detections image {name!r}", r, 5)
            for name, r in raw.items()
        }
    extra = {k: v for k, v in doc.items() if k not in _RESERVED}
    return SearchResults(dataset, queries, gallery_detections, extra)


def _gallery_size(protocol_name: str) -> float:
    """The gallery size of a CUHK-SYSU-style protocol name (``.../G100`` -> 100, ``.../G-1``,
    the whole pool -> inf); other names -> nan (never smaller or larger)."""
    size = protocol_name.rpartition("/G")[2]
    if not size.lstrip("-").isdigit() or "/G" not in protocol_name:
        return math.nan
    return math.inf if int(size) < 0 else float(int(size))


def validate_against_protocol(results: SearchResults, protocol: SearchProtocol, path: str) -> None:
    """Check that ``results`` can be scored with ``protocol``.

    Raises:
        ValueError naming ``path`` and the problem: data set mismatch, query index out of range,
        query image differing from the protocol's, gallery image not in that query's gallery.
    """
    if results.dataset != protocol.dataset:
        raise ValueError(
            f"{path}: results are for data set {results.dataset!r}, the protocol "
            f"{protocol.name!r} is for {protocol.dataset!r}"
        )
    made_for = results.extra.get("protocol")
    if isinstance(made_for, str) and made_for.rpartition("/G")[0] == protocol.name.rpartition(
            "/G")[0] and _gallery_size(made_for) < _gallery_size(protocol.name):
        # images of the larger galleries were never searched: they would count as "no detection"
        size = made_for.rpartition("/G")[2]
        raise ValueError(
            f"{path}: the results were made for {made_for}, a smaller gallery than "
            f"{protocol.name}'s: its other images were not searched (score them with "
            f"--gallery-size {size}, or evaluate the model at the larger size)"
        )
    for q in results.queries:
        if q.index >= len(protocol):
            raise ValueError(
                f"{path}: query index {q.index} out of range: {protocol.name} has "
                f"{len(protocol)} queries"
            )
        expected = protocol.queries[q.index].image
        if q.image != expected:
            raise ValueError(
                f"{path}: query {q.index} image is {q.image!r}, the protocol's is {expected!r}"
            )
        if q.gallery:
            allowed = set(protocol.gallery(q.index).images)
            stray = [name for name in q.gallery if name not in allowed]
            if stray:
                made_for = results.extra.get("protocol")
                hint = ""
                if isinstance(made_for, str) and made_for != protocol.name:
                    size = made_for.rpartition("/G")[2]
                    hint = (f": the results were made for {made_for}, scored here with "
                            f"{protocol.name}" + (f" (score them with --gallery-size {size})"
                                                  if size.lstrip("-").isdigit() else ""))
                raise ValueError(
                    f"{path}: query {q.index}: image {stray[0]!r} is not in its gallery "
                    f"({protocol.name}){hint}"
                )
