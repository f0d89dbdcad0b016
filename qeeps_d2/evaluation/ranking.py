"""One query's detections in the order the search protocol ranks them (numpy only).

:func:`qeeps_d2.evaluation.search_metrics.score_query` reduces a query to its AP and hits;
the results viewer and the top-k export need the ranking itself, with each detection marked
right or wrong by the same rules:

1. detections with ``det_score >= det_thresh`` are kept;
2. they are sorted by descending similarity, stably, in gallery-entry order then row order (the
   order ``score_query`` uses);
3. in a gallery entry holding the query person, the first detection in that order whose IoU
   with the person's box reaches ``min(0.5, w*h / ((w+10)*(h+10)))`` is the entry's single true
   positive; every other detection is wrong (a second box on the person included).

A CUHK-SYSU gallery may list an image twice; the protocol then ranks its detections twice.
:class:`RankedDetections` keeps each detection once (where its first copy ranks), right when any
of its copies is a true positive, and keeps the protocol's own count in ``best_rank``: the
1-based rank of the first true positive in the ranking the protocol scores, so that
``best_rank <= k`` is exactly ``score_query``'s hit@k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional

import numpy as np

from ..data.search_protocol import Gallery
from .box_iou import box_iou
from .search_metrics import iou_thresholds

__all__ = ["RankedDetections", "rank_query"]

_EMPTY_ROWS = np.zeros((0, 6), dtype=np.float64)


@dataclass(frozen=True)
class RankedDetections:
    """A query's kept detections, best first, each gallery detection once.

    Attributes:
        images: N gallery image names, one per detection.
        rows: (N, 6) float64 ``[x1, y1, x2, y2, det_score, similarity]``.
        correct: (N,) bool, the detection is a true positive of the protocol.
        best_rank: 1-based rank of the first true positive in the protocol's ranking (gallery
            entries listed twice counted twice, as scored), None when nothing was found.
        count_gt: gallery entries holding the query person.
    """

    images: List[str]
    rows: np.ndarray
    correct: np.ndarray
    best_rank: Optional[int]
    count_gt: int

    def __len__(self) -> int:
        return len(self.images)

    def top(self, k: int) -> "RankedDetections":
        """The first ``k`` detections (``best_rank`` and ``count_gt`` unchanged)."""
        return RankedDetections(self.images[:k], self.rows[:k], self.correct[:k],
                                self.best_rank, self.count_gt)


def rank_query(gallery: Gallery, detections: Mapping[str, np.ndarray],
               det_thresh: float = 0.5) -> RankedDetections:
    """Rank one query's detections over its gallery (module docstring).

    Args:
        gallery: the query's gallery (entries in protocol order, GT box or NaN per entry).
        detections: image name -> (N, 6) rows ``[x1, y1, x2, y2, det_score, similarity]``.
        det_thresh: detections with ``det_score >= det_thresh`` are ranked.

    Returns:
        :class:`RankedDetections` over all kept detections.
    """
    names = list(dict.fromkeys(gallery.images))
    image_id = {name: i for i, name in enumerate(names)}
    per_entry = [np.asarray(detections.get(name, _EMPTY_ROWS), np.float64).reshape(-1, 6)
                 for name in gallery.images]
    counts = np.fromiter((len(r) for r in per_entry), dtype=np.int64, count=len(per_entry))
    rows = np.concatenate(per_entry) if per_entry else _EMPTY_ROWS
    entry = np.repeat(np.arange(len(per_entry)), counts)
    # a detection's identity: (distinct image, row within that image's array)
    row_in_image = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    image = np.fromiter((image_id[name] for name in gallery.images), dtype=np.int64,
                        count=len(per_entry))[entry]
    keep = rows[:, 4] >= det_thresh
    rows, entry, image, row_in_image = rows[keep], entry[keep], image[keep], row_in_image[keep]

    order = np.argsort(-rows[:, 5], kind="stable")
    rows, entry, image, row_in_image = rows[order], entry[order], image[order], row_in_image[order]
    gt = gallery.gt_boxes[entry]
    matchable = ~np.isnan(gt[:, 0])
    candidate = np.zeros(len(rows), dtype=bool)
    candidate[matchable] = box_iou(rows[matchable, :4], gt[matchable]) >= iou_thresholds(
        gt[matchable])
    candidate_pos = np.flatnonzero(candidate)
    _, first = np.unique(entry[candidate_pos], return_index=True)
    labels = np.zeros(len(rows), dtype=bool)
    labels[candidate_pos[first]] = True
    best_rank = int(np.argmax(labels)) + 1 if labels.any() else None

    # each detection once, where its first copy ranks; right if any copy is
    key = image * (int(counts.max(initial=0)) + 1) + row_in_image
    _, first_copy, copy_of = np.unique(key, return_index=True, return_inverse=True)
    correct = np.zeros(len(first_copy), dtype=bool)
    np.logical_or.at(correct, copy_of.reshape(-1), labels)
    shown = np.sort(first_copy)
    position = np.empty(len(first_copy), dtype=np.int64)
    position[np.argsort(first_copy)] = np.arange(len(first_copy))  # unique key -> shown slot
    correct_shown = np.zeros(len(shown), dtype=bool)
    correct_shown[position] = correct
    return RankedDetections([names[i] for i in image[shown].tolist()], rows[shown],
                            correct_shown, best_rank, gallery.count_gt)
