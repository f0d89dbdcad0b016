"""Build the results viewer: score results files per query, render chosen queries, write the page.

For one or more results files of the same test set (several: models side by side, as the demo
compares OIM and QEEPS), :func:`build_viewer`

1. reads and checks each file against the protocol (data set, gallery size, cross-camera), as
   ``qeeps-eval`` does;
2. scores every query with the project's scoring (:func:`~qeeps_d2.evaluation.score_search`),
   so a model's mean AP on the page is what ``qeeps-eval`` prints for its file, and ranks each
   query's detections by the same rules (:func:`~qeeps_d2.evaluation.ranking.rank_query`);
3. renders the chosen queries (:mod:`.selection`): per query one JPEG, one row per model: the
   query person, then its top-k matches framed green (the query person) or red (someone else),
   each with its similarity and detection score;
4. writes the page (:mod:`.page`): a metric line per model, a table of every query (AP, top-1,
   gallery images holding the person, rank of the first right match per model) sortable by
   clicking a header, and the rendered queries; optionally the table as JSON.
"""
from __future__ import annotations

import glob
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from ..data.datasets.catalog import load_protocol
from ..data.search_protocol import SearchProtocol
from ..evaluation.ranking import RankedDetections, rank_query
from ..evaluation.results_file import SearchResults, read_results, validate_against_protocol
from ..evaluation.search_metrics import TOP_K, SearchScores, score_search
from ..search.gallery import read_image_bgr
from ..search.render import match_strip
from ..search.searcher import Match
from .page import Cell, Column, Section, write_page
from .selection import QuerySelection, select_queries

__all__ = ["ModelResults", "QueryRow", "ViewerReport", "build_viewer", "load_models",
           "query_table", "render_query"]

_NO_RANK = 10 ** 9  # sort value of "no right match"


@dataclass
class ModelResults:
    """One results file, checked and scored.

    Attributes:
        label: the model's name on the page ("" for a single unnamed file).
        path: the results file.
        results: the file's content.
        scores: its queries scored with the protocol (as ``qeeps-eval`` scores them).
    """

    label: str
    path: str
    results: SearchResults
    scores: SearchScores

    def __post_init__(self):
        self.detections = self.results.detections_by_query()
        self._row = {int(q): i for i, q in enumerate(self.scores.query_indices)}

    @property
    def queries(self) -> List[int]:
        """The scored queries (those of the file), ascending."""
        return list(self._row)

    def ap(self, query: int) -> float:
        return float(self.scores.ap[self._row[query]])

    def top1(self, query: int) -> bool:
        return bool(self.scores.hits[self._row[query], TOP_K.index(1)])


@dataclass(frozen=True)
class QueryRow:
    """One query of the table.

    Attributes:
        index, image, person_id: the protocol's query.
        count_gt: gallery entries holding the query person.
        ap, top1, best_rank: per model: AP, hit@1, 1-based rank of the first right match
            (None: not found).
    """

    index: int
    image: str
    person_id: int
    count_gt: int
    ap: Tuple[float, ...]
    top1: Tuple[bool, ...]
    best_rank: Tuple[Optional[int], ...]


@dataclass(frozen=True)
class ViewerReport:
    """What :func:`build_viewer` wrote: the page, the rendered queries, the table."""

    page: str
    rendered: List[int]
    table: List[QueryRow]
    models: List[ModelResults]
    protocol: SearchProtocol


def load_models(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
                dataset: Optional[str] = None, gallery_size: int = 100,
                cross_camera: bool = False, det_thresh: float = 0.5
                ) -> Tuple[SearchProtocol, List[ModelResults]]:
    """Read, check and score results files of one test set.

    Args:
        paths: results files (``.json`` / ``.json.gz``).
        labels: a name per file (default: none for one file, ``#1``, ``#2``, ... for several).
        dataset: the test set (default: the first file's).
        gallery_size, cross_camera: the protocol, as ``qeeps-eval`` takes them.
        det_thresh: detections with ``det_score >= det_thresh`` are ranked.

    Raises:
        ValueError / FileNotFoundError: naming the file: unreadable or malformed, made for
            another data set or protocol, holding only detections above ``det_thresh``.
    """
    if not paths:
        raise ValueError("no results file given")
    if labels is None:
        labels = [""] if len(paths) == 1 else [f"#{i + 1}" for i in range(len(paths))]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} results files")
    if det_thresh < 0:
        raise ValueError(f"det_thresh must be >= 0, got {det_thresh}")
    loaded = []
    for path in paths:
        results = read_results(path)
        dataset = dataset or results.dataset
        if results.dataset != dataset:
            raise ValueError(f"{path}: results are for data set {results.dataset!r}, not "
                             f"{dataset!r}")
        min_score = results.extra.get("min_det_score")
        if isinstance(min_score, (int, float)) and det_thresh < min_score:
            raise ValueError(f"{path} only holds detections with det_score >= {min_score}; "
                             f"det_thresh {det_thresh} cannot be evaluated from it")
        loaded.append(results)
    protocol = load_protocol(dataset, gallery_size, cross_camera)
    models = []
    for label, path, results in zip(labels, paths, loaded):
        validate_against_protocol(results, protocol, path)
        scores = score_search(protocol, results.detections_by_query(), det_thresh)
        models.append(ModelResults(label, path, results, scores))
    return protocol, models


def query_table(protocol: SearchProtocol, models: Sequence[ModelResults],
                det_thresh: float = 0.5, progress: bool = False) -> List[QueryRow]:
    """One row per query present in every file, in index order."""
    common = sorted(set.intersection(*(set(m.queries) for m in models)))
    rows = []
    for q in tqdm(common, desc="rank", unit="query", disable=not progress, leave=False):
        query, gallery = protocol.queries[q], protocol.gallery(q)
        ranks = tuple(rank_query(gallery, m.detections.get(q, {}), det_thresh).best_rank
                      for m in models)
        rows.append(QueryRow(q, query.image, int(query.person_id), gallery.count_gt,
                             tuple(m.ap(q) for m in models), tuple(m.top1(q) for m in models),
                             ranks))
    return rows


def _image_reader(root: str, capacity: int = 64) -> Callable[[str], np.ndarray]:
    """``name -> BGR image`` under ``root``, keeping the ``capacity`` most recent in memory."""
    cache: "OrderedDict[str, np.ndarray]" = OrderedDict()

    def read(name: str) -> np.ndarray:
        if name in cache:
            cache.move_to_end(name)
        else:
            cache[name] = read_image_bgr(os.path.join(root, name))
            if len(cache) > capacity:
                cache.popitem(last=False)
        return cache[name]

    return read


def _strip_title(label: str, row: QueryRow, k: int, ranked: RankedDetections, ap: float) -> str:
    first = f"first right at rank {row.best_rank[k]}" if row.best_rank[k] else "not found"
    prefix = f"{label}: " if label else ""
    return (f"{prefix}AP {ap:.3f}, {first}, {int(ranked.correct.sum())} of top-{len(ranked)} "
            f"right ({row.count_gt} gallery images hold this person)")


def render_query(protocol: SearchProtocol, row: QueryRow, models: Sequence[ModelResults],
                 topk: int, det_thresh: float, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """The query's image: one match strip per model, stacked, as (H, W, 3) uint8 BGR."""
    query = protocol.queries[row.index]
    gallery = protocol.gallery(row.index)
    strips = []
    for k, model in enumerate(models):
        ranked = rank_query(gallery, model.detections.get(row.index, {}), det_thresh).top(topk)
        matches = [Match(name, 0, tuple(r[:4].tolist()), float(r[4]), float(r[5]), read(name))
                   for name, r in zip(ranked.images, ranked.rows)]
        title = _strip_title(model.label, row, k, ranked, model.ap(row.index))
        strips.append(match_strip(read(query.image), query.box, matches,
                                  correct=ranked.correct.tolist(), title=title))
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255)
              for s in strips]
    return np.concatenate(strips, axis=0)


def _summary(protocol: SearchProtocol, models: Sequence[ModelResults], det_thresh: float
             ) -> List[str]:
    lines = []
    for m in models:
        s = m.scores.summary()
        n, total = len(m.scores), len(protocol)
        partial = f" (partial: {n} of {total} queries)" if n < total else ""
        metrics = ", ".join([f"mAP {100 * s['mAP']:.2f}%"]
                            + [f"top-{k} {100 * s[f'top{k}']:.2f}%" for k in TOP_K])
        lines.append(f"{m.label + ': ' if m.label else ''}{metrics} over {n} queries{partial}"
                     f" - {m.path}")
    lines.append(f"Protocol {protocol.name}, det_thresh {det_thresh:g}; green = the query "
                 "person (the protocol's IoU rule, one right match per gallery image), red = "
                 "someone else or a second box on the person.")
    return lines


def _columns(models: Sequence[ModelResults]) -> List[Column]:
    columns = [Column("query", tip="index in the protocol's query list"),
               Column("image", numeric=False), Column("person", tip="person id"),
               Column("#gt", tip="gallery images holding the query person")]
    for m in models:
        suffix = f" {m.label}" if m.label else ""
        columns += [Column(f"AP{suffix}"), Column(f"top-1{suffix}"),
                    Column(f"best rank{suffix}", tip="rank of the first right match")]
    return columns


def _cells(row: QueryRow) -> List[Cell]:
    cells = [Cell(str(row.index), row.index), Cell(row.image, row.image),
             Cell(str(row.person_id), row.person_id), Cell(str(row.count_gt), row.count_gt)]
    for ap, top1, rank in zip(row.ap, row.top1, row.best_rank):
        cells += [Cell(f"{ap:.3f}", repr(ap)), Cell("right" if top1 else "wrong", int(top1)),
                  Cell(str(rank) if rank else "-", rank or _NO_RANK)]
    return cells


def _clear_old_images(folder: str, keep: Sequence[str]) -> None:
    keep = {os.path.abspath(p) for p in keep}
    for path in glob.glob(os.path.join(folder, "query_*.jpg")):
        if os.path.abspath(path) not in keep:
            os.remove(path)


def build_viewer(results: Sequence[str], out_dir: str, *, labels: Optional[Sequence[str]] = None,
                 dataset: Optional[str] = None, gallery_size: int = 100,
                 cross_camera: bool = False, det_thresh: float = 0.5, topk: int = 5,
                 selection: QuerySelection = QuerySelection(), page_name: str = "index.html",
                 image_folder: str = "images", title: Optional[str] = None,
                 table_json: Optional[str] = None, progress: bool = True) -> ViewerReport:
    """Write the viewer page of one or more results files (module docstring).

    Args:
        results: results files of the same test set.
        out_dir: the page's folder; images go to ``out_dir/image_folder`` (JPEG, linked
            relative to the page; ``query_*.jpg`` files of earlier runs there are removed).
        labels: a name per file (default: none for one file, ``#1``, ``#2``, ...).
        dataset, gallery_size, cross_camera, det_thresh: the protocol, as ``qeeps-eval``.
        topk: matches shown per query and model.
        selection: the queries to render (the table lists every query).
        page_name: the page's file name in ``out_dir``.
        title: page title (default: names the data set and protocol).
        table_json: also write the table and each model's metrics to this JSON file.
        progress: show progress bars.

    Returns:
        :class:`ViewerReport`.

    Raises:
        ValueError / FileNotFoundError with one-line messages (bad files, a query not in the
        results, the data set's images folder missing).
    """
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    protocol, models = load_models(results, labels, dataset, gallery_size, cross_camera,
                                   det_thresh)
    common = sorted(set.intersection(*(set(m.queries) for m in models)))
    picked = select_queries(common, {q: models[0].ap(q) for q in common}, selection)
    if picked and not os.path.isdir(protocol.image_root):
        raise FileNotFoundError(f"images folder {protocol.image_root} of {protocol.dataset} not "
                                "found: the viewer draws the data set's images")
    table = query_table(protocol, models, det_thresh, progress)
    by_index = {r.index: r for r in table}
    image_dir = os.path.join(out_dir, image_folder)
    os.makedirs(image_dir, exist_ok=True)
    read = _image_reader(protocol.image_root)
    sections = []
    for q in tqdm(picked, desc="render", unit="query", disable=not progress):
        row = by_index[q]
        path = os.path.join(image_dir, f"query_{q:05d}.jpg")
        image = render_query(protocol, row, models, topk, det_thresh, read)
        if not cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise OSError(f"could not write {path}")
        sections.append(Section(
            f"q{q}", f"Query {q} ({row.image}, person {row.person_id})", path,
            f"Top-{topk} matches per model in {protocol.name}; blue: the query box."))
    _clear_old_images(image_dir, [s.image for s in sections])
    shown = set(picked)
    anchors = [f"q{r.index}" if r.index in shown else None for r in table]
    note = (f"{len(table)} queries, {len(picked)} rendered ({selection.describe()}): click a "
            "header to sort (AP: worst first), a query number to see it.")
    page = write_page(os.path.join(out_dir, page_name),
                      title or f"Results viewer: {protocol.dataset} ({protocol.name})",
                      _summary(protocol, models, det_thresh), _columns(models),
                      [_cells(r) for r in table], anchors, sections, note)
    if table_json:
        _write_table_json(table_json, protocol, models, table, picked, det_thresh)
    return ViewerReport(page, list(picked), table, list(models), protocol)


def _write_table_json(path: str, protocol: SearchProtocol, models: Sequence[ModelResults],
                      table: Sequence[QueryRow], picked: Sequence[int], det_thresh: float) -> None:
    shown = set(picked)
    doc = {
        "protocol": protocol.name, "dataset": protocol.dataset, "det_thresh": det_thresh,
        "models": [{"label": m.label, "results": m.path, **m.scores.summary()} for m in models],
        "queries": [{"index": r.index, "image": r.image, "person_id": r.person_id,
                     "count_gt": r.count_gt, "ap": list(r.ap), "top1": list(r.top1),
                     "best_rank": list(r.best_rank), "rendered": r.index in shown}
                    for r in table],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
