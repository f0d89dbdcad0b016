"""Person-search scoring: per-query AP and top-k, and their means (numpy only).

Implements the protocol of OIM's ``psdb.py:evaluate_search`` (datasets-and-protocols.md 3.2) for
one query at a time, vectorised over the query's whole gallery:

1. detections with ``det_score >= det_thresh`` are kept;
2. ``count_gt`` = gallery entries holding the target, counted before any filtering (entries
   with no detection count too);
3. in an entry holding the target (GT box w x h, ``w = x2 - x1``, ``h = y2 - y1``), the first
   detection in descending-similarity order with ``IoU >= min(0.5, w*h / ((w+10)*(h+10)))``
   is the entry's single true positive; IoU uses continuous coordinates (no +1);
4. AP = average_precision(labels, similarities) * count_tp / count_gt, 0 when count_tp == 0;
5. hit@k (k = 1, 5, 10) = a true positive among the k most similar detections (boxes, not
   images) of the whole gallery.

Gallery entries are processed one by one in the protocol's order: an image listed twice adds its
detections twice, and each copy can add its own true positive (psdb.py behaviour).

Ties in similarity: the ranking is a *stable* descending sort of the detections concatenated in
gallery-entry order, then row order within an entry. Within an entry, the earliest row among
equally similar matching detections becomes the true positive; AP does not depend on this choice
(tied scores form one precision-recall point), top-k can at a tie straddling rank k. The reference
code sorts with ``np.argsort(sim)[::-1]``, whose tie order is unspecified.

A query whose gallery holds no target (count_gt == 0, possible with PRW cross-camera) scores
AP 0 and no hits, as the reference's ``count_tp == 0`` rule gives; :class:`SearchScores` counts
such queries so that a report can say so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from ..data.search_protocol import Gallery, SearchProtocol
from .average_precision import average_precision_sorted
from .box_iou import box_iou

__all__ = [
    "TOP_K",
    "QueryScore",
    "SearchScores",
    "iou_thresholds",
    "score_query",
    "score_search",
]

TOP_K: Tuple[int, ...] = (1, 5, 10)
_EMPTY_ROWS = np.zeros((0, 6), dtype=np.float64)


@dataclass(frozen=True)
class QueryScore:
    """Scores of one query.

    Attributes:
        ap: average precision, already scaled by the recall count_tp / count_gt.
        hits: (len(TOP_K),) bool, hit@k for k in TOP_K.
        count_gt: gallery entries holding the target.
        count_tp: entries where the target was found (<= count_gt).
    """

    ap: float
    hits: np.ndarray
    count_gt: int
    count_tp: int


@dataclass(frozen=True)
class SearchScores:
    """Scores of a set of queries (one row per scored query, in ascending query index).

    Attributes:
        query_indices: (Q,) int, protocol positions of the scored queries.
        ap: (Q,) float AP per query.
        hits: (Q, len(TOP_K)) bool hit@k per query.
        count_gt: (Q,) int target entries per query.
        count_tp: (Q,) int found target entries per query.
    """

    query_indices: np.ndarray
    ap: np.ndarray
    hits: np.ndarray
    count_gt: np.ndarray
    count_tp: np.ndarray

    def __len__(self) -> int:
        return int(self.query_indices.size)

    @property
    def mean_ap(self) -> float:
        """Mean AP over the scored queries (fraction in [0, 1])."""
        return float(self.ap.mean()) if len(self) else 0.0

    def top_k(self, k: int) -> float:
        """Fraction of the scored queries with a hit in the top k (k must be in TOP_K)."""
        if k not in TOP_K:
            raise ValueError(f"k must be one of {TOP_K}, got {k}")
        return float(self.hits[:, TOP_K.index(k)].mean()) if len(self) else 0.0

    @property
    def num_without_target(self) -> int:
        """Queries whose gallery holds no target (scored 0)."""
        return int((self.count_gt == 0).sum())

    def summary(self) -> Dict[str, float]:
        """``{"mAP", "top1", "top5", "top10", "num_queries", "num_without_target"}``, fractions."""
        out: Dict[str, float] = {"mAP": self.mean_ap}
        out.update({f"top{k}": self.top_k(k) for k in TOP_K})
        out["num_queries"] = len(self)
        out["num_without_target"] = self.num_without_target
        return out


def iou_thresholds(gt_boxes: np.ndarray) -> np.ndarray:
    """Small-box rule: (G,) ``min(0.5, w*h / ((w+10)*(h+10)))`` for (G, 4) XYXY boxes."""
    w = gt_boxes[:, 2] - gt_boxes[:, 0]
    h = gt_boxes[:, 3] - gt_boxes[:, 1]
    return np.minimum(0.5, (w * h) / ((w + 10.0) * (h + 10.0)))


def score_query(
    gallery: Gallery, detections: Mapping[str, np.ndarray], det_thresh: float = 0.5
) -> QueryScore:
    """Score one query against its gallery.

    Args:
        gallery: the query's gallery (entries in protocol order, GT box or NaN per entry).
        detections: image name -> (N, 6) rows ``[x1, y1, x2, y2, det_score, similarity]`` of this
            query's detections in that image (original-image pixels). Missing images had none.
        det_thresh: detections with ``det_score >= det_thresh`` are ranked.

    Returns:
        The query's :class:`QueryScore`.
    """
    per_entry = [detections.get(name, _EMPTY_ROWS) for name in gallery.images]
    counts = np.fromiter((len(rows) for rows in per_entry), dtype=np.int64, count=len(per_entry))
    rows = np.concatenate(per_entry).reshape(-1, 6) if per_entry else _EMPTY_ROWS
    entry = np.repeat(np.arange(len(per_entry)), counts)
    keep = rows[:, 4] >= det_thresh
    rows, entry = rows[keep], entry[keep]

    count_gt = gallery.count_gt
    order = np.argsort(-rows[:, 5], kind="stable")
    rows, entry = rows[order], entry[order]

    gt = gallery.gt_boxes[entry]
    matchable = ~np.isnan(gt[:, 0])
    candidate = np.zeros(len(rows), dtype=bool)
    candidate[matchable] = box_iou(rows[matchable, :4], gt[matchable]) >= iou_thresholds(
        gt[matchable]
    )
    # The first candidate (in descending similarity) of each entry is its true positive.
    candidate_pos = np.flatnonzero(candidate)
    _, first = np.unique(entry[candidate_pos], return_index=True)
    tp_pos = candidate_pos[first]
    labels = np.zeros(len(rows), dtype=bool)
    labels[tp_pos] = True

    count_tp = int(tp_pos.size)
    if count_tp == 0:
        return QueryScore(0.0, np.zeros(len(TOP_K), dtype=bool), count_gt, 0)
    ap = average_precision_sorted(labels, rows[:, 5]) * count_tp / count_gt
    hits = tp_pos.min() < np.asarray(TOP_K)
    return QueryScore(ap, hits, count_gt, count_tp)


def score_search(
    protocol: SearchProtocol,
    detections: Mapping[int, Mapping[str, np.ndarray]],
    det_thresh: float = 0.5,
    query_indices: Optional[Iterable[int]] = None,
) -> SearchScores:
    """Score several queries of a protocol.

    Args:
        protocol: the search protocol (queries and their galleries).
        detections: query index -> (image name -> (N, 6) rows), as for :func:`score_query`.
            A query absent from the mapping had no detection at all.
        det_thresh: detection-score threshold (default 0.5, as in every reference).
        query_indices: the queries to score; default: the keys of ``detections``.

    Returns:
        :class:`SearchScores` over the scored queries, in ascending query index.
    """
    indices = sorted(detections if query_indices is None else query_indices)
    for i in indices:
        if not 0 <= i < len(protocol):
            raise ValueError(
                f"query index {i} out of range for protocol {protocol.name} "
                f"({len(protocol)} queries)"
            )
    scores = [score_query(protocol.gallery(i), detections.get(i, {}), det_thresh) for i in indices]
    return SearchScores(
        query_indices=np.asarray(indices, dtype=np.int64),
        ap=np.asarray([s.ap for s in scores], dtype=np.float64),
        hits=np.asarray([s.hits for s in scores], dtype=bool).reshape(len(scores), len(TOP_K)),
        count_gt=np.asarray([s.count_gt for s in scores], dtype=np.int64),
        count_tp=np.asarray([s.count_tp for s in scores], dtype=np.int64),
    )
