"""Cascade search: a query-agnostic first stage shortlists gallery images, QEEPS re-scores them
(numpy only).

A query-guided model must run once per (query, gallery image) pair. In cascade mode the same
network first runs with query guidance off (QSSE blocks pass through, QRPN off, the ROI head's
plain OIM embedding): every gallery image once and every query box once, similarity = embedding
dot product, or, with a fitted local similarity head (MODEL.QEEPS.QSIMNET.LOCAL), that head's
score of the query's and the detection's cells, which come out of those same forwards
(``qeeps_d2.modeling.local_similarity.agnostic_similarity``). Per query, its gallery images are ranked by their best first-stage similarity over
the detections with ``score >= det_thresh`` (images without such a detection last; ties keep
gallery order) and the top K are re-scored in pair mode. K >= the gallery size gives back the
exhaustive pair search.

Merged rows of a query (:func:`merge_cascade_rows`): a shortlisted image gets its pair-mode rows;
every other image keeps its first-stage rows with the similarity shifted by
``-FIRST_STAGE_OFFSET`` (3). Second-stage similarities lie in [-1, 1] (cosine without QSimNet, a
probability in [0, 1] with it) and first-stage ones lie in [-1, 1] too (cosines or the local head's score), so a shifted
first-stage similarity lies in [-4, -2], below the re-scored detections, and the first-stage
order among them is kept. Not every re-scored detection belongs above them, though: the pair
stage re-scores everyone in a shortlisted image, and a bystander it scores low would, ranked
above all first-stage rows, push down a real match of an image outside the shortlist (measured
on SynthPS: cascade mAP 1-4 points below the same network's first stage even when the pair
stage changed nothing). So only the re-scored detections that score at least the *floor* (the
lowest best similarity among the shortlisted images, :func:`rescored_floor`) rank above the
first-stage rows; the others are shifted by ``-LOW_RESCORED_OFFSET`` (6), to [-7, -5], below
them (when every image is re-scored nothing is shifted: the rows are the exhaustive pair
search's). The best detection of every shortlisted image stays above the floor. A similarity below -1
in a cascade results file therefore marks a first-stage score or a demoted pair-mode one.

Cost (:class:`EvaluationCost`): exhaustive = sum over queries of their distinct gallery images
pair forwards; cascade = each distinct gallery image and query box once (query-agnostic
forwards) + sum over queries of min(K, distinct gallery images) pair forwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "CASCADE_MODE",
    "FIRST_STAGE_OFFSET",
    "LOW_RESCORED_OFFSET",
    "rescored_floor",
    "best_similarity",
    "shortlist_images",
    "shortlist",
    "merge_cascade_rows",
    "cascade_rows",
    "EvaluationCost",
    "exhaustive_cost",
    "cascade_cost",
    "protocol_costs",
]

CASCADE_MODE = "cascade"
# First-stage similarities of images that are not re-scored are shifted down by this much (see
# the module docstring): scores in [-1, 1] land in [-4, -2], below any pair-mode similarity.
FIRST_STAGE_OFFSET = 3.0
# Re-scored detections below the floor (rescored_floor) are shifted down by this much: [-7, -5],
# below every shifted first-stage similarity.
LOW_RESCORED_OFFSET = 6.0


def best_similarity(rows: Optional[np.ndarray], det_thresh: float) -> float:
    """The highest similarity of the rows (N, 6) ``[x1, y1, x2, y2, score, sim]`` whose score is
    >= ``det_thresh``; ``-inf`` when there is none."""
    if rows is None or len(rows) == 0:
        return -np.inf
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    kept = rows[rows[:, 4] >= det_thresh, 5]
    return float(kept.max()) if len(kept) else -np.inf


def shortlist_images(
    images: Sequence[str], rows: Mapping[str, np.ndarray], k: int, det_thresh: float
) -> List[str]:
    """The (at most) ``k`` images of one query's gallery to re-score.

    Args:
        images: the query's gallery images (duplicates allowed; the first occurrence counts).
        rows: image -> first-stage rows (N, 6); missing images have no detection.
        k: shortlist length (>= 1).
        det_thresh: only detections with ``score >= det_thresh`` rank an image.

    Returns:
        the top-``k`` distinct images by best first-stage similarity, best first (images
        without a detection rank last; ties keep gallery order).
    """
    if k < 1:
        raise ValueError(f"cascade shortlist length must be >= 1, got {k}")
    distinct = list(dict.fromkeys(images))
    best = np.array([best_similarity(rows.get(n), det_thresh) for n in distinct])
    order = np.argsort(-best, kind="stable")[:k]
    return [distinct[j] for j in order]


def shortlist(
    galleries: Mapping[int, Sequence[str]],
    first_stage: Mapping[int, Mapping[str, np.ndarray]],
    k: int,
    det_thresh: float,
) -> Dict[int, List[str]]:
    """:func:`shortlist_images` for every query: query index -> its top-``k`` images.

    Args:
        galleries: query index -> its gallery images.
        first_stage: query index -> image -> first-stage rows (N, 6).
    """
    return {
        i: shortlist_images(images, first_stage.get(i, {}), k, det_thresh)
        for i, images in galleries.items()
    }


def rescored_floor(best_similarities) -> float:
    """The floor of a query's re-scored detections: the lowest of the shortlisted images' best
    similarities (``-inf`` entries, images without a kept detection, ignored); ``inf`` when
    there is none."""
    finite = [b for b in best_similarities if b != -np.inf]
    return min(finite) if finite else np.inf


def merge_cascade_rows(
    images: Sequence[str],
    first_stage: Mapping[str, np.ndarray],
    second_stage: Mapping[str, np.ndarray],
    shortlisted: Sequence[str],
    det_thresh: float,
) -> Dict[str, np.ndarray]:
    """One query's cascade rows (see the module docstring).

    Args:
        images: the query's gallery images.
        first_stage: image -> first-stage rows (N, 6) (missing: no detection).
        second_stage: image -> pair-mode rows (N, 6) of the shortlisted images (missing: no
            detection).
        shortlisted: the re-scored images.
        det_thresh: detections below this score are not kept by the protocol; they do not set
            the floor.

    Returns:
        image -> (N, 6) float64 rows: pair-mode rows for shortlisted images (similarity -
        ``LOW_RESCORED_OFFSET`` below the floor), first-stage rows with similarity -
        ``FIRST_STAGE_OFFSET`` for the others; images without rows are left out.
    """
    rescored = set(shortlisted)
    pair = {n: np.array(second_stage[n], dtype=np.float64).reshape(-1, 6)
            for n in dict.fromkeys(shortlisted) if second_stage.get(n) is not None}
    floor = rescored_floor(best_similarity(rows, det_thresh) for rows in pair.values())
    if not any(n not in rescored and n in first_stage for n in images):
        floor = -np.inf  # every image re-scored: the exhaustive pair search's rows, unchanged
    merged = {}
    for name in dict.fromkeys(images):
        if name in rescored:
            if name in pair:
                rows = pair[name].copy()
                rows[rows[:, 5] < floor, 5] -= LOW_RESCORED_OFFSET
                merged[name] = rows
        elif name in first_stage:
            rows = np.array(first_stage[name], dtype=np.float64).reshape(-1, 6)
            rows[:, 5] -= FIRST_STAGE_OFFSET
            merged[name] = rows
    return merged


def cascade_rows(
    galleries: Mapping[int, Sequence[str]],
    first_stage: Mapping[int, Mapping[str, np.ndarray]],
    pair_rows: Mapping[int, Mapping[str, np.ndarray]],
    k: int,
    det_thresh: float,
):
    """Every query's cascade rows from first-stage rows and pair rows that cover (at least) the
    shortlisted images, e.g. an exhaustive run's: the cascade's result without a new forward
    pass (``tools/cascade_eval.py --emulate``).

    Args:
        galleries: query index -> its gallery images.
        first_stage: query index -> image -> first-stage rows (N, 6).
        pair_rows: query index -> image -> pair-mode rows (N, 6).

    Returns:
        (query index -> image -> merged rows, query index -> shortlisted images)
    """
    lists = shortlist(galleries, first_stage, k, det_thresh)
    merged = {
        i: merge_cascade_rows(images, first_stage.get(i, {}), pair_rows.get(i, {}), lists[i],
                              det_thresh)
        for i, images in galleries.items()
    }
    return merged, lists


@dataclass(frozen=True)
class EvaluationCost:
    """Forward passes of one evaluation.

    Attributes:
        pairs: (query, gallery image) pair forwards (query-guided).
        gallery_images: query-agnostic gallery-image forwards.
        query_boxes: query-agnostic query-box forwards.
    """

    pairs: int
    gallery_images: int = 0
    query_boxes: int = 0

    def seconds(self, per_pair: float, per_image: float = 0.0, per_query: float = 0.0) -> float:
        """Wall time at the given per-forward costs (seconds per pair / image / query box)."""
        return (self.pairs * per_pair + self.gallery_images * per_image
                + self.query_boxes * per_query)


def exhaustive_cost(gallery_sizes: Sequence[int]) -> EvaluationCost:
    """Pair search over every query's whole gallery (``gallery_sizes``: distinct images per
    query), e.g. ``exhaustive_cost([100] * 2900)`` for CUHK-SYSU G100 (290,000 pairs)."""
    return EvaluationCost(pairs=int(np.sum(gallery_sizes, dtype=np.int64)))


def cascade_cost(gallery_sizes: Sequence[int], k: int, num_gallery_images: int) -> EvaluationCost:
    """Cascade with shortlist ``k``: ``num_gallery_images`` distinct gallery images and one query
    box per query once, then min(k, gallery size) pairs per query; e.g. CUHK-SYSU G100, K=10:
    ``cascade_cost([100] * 2900, 10, 6978)`` = 29,000 pairs + 6,978 images + 2,900 boxes."""
    sizes = np.asarray(gallery_sizes, dtype=np.int64)
    return EvaluationCost(
        pairs=int(np.minimum(sizes, k).sum()),
        gallery_images=int(num_gallery_images),
        query_boxes=len(sizes),
    )


def protocol_costs(protocol, k: int, query_indices: Optional[Sequence[int]] = None):
    """(exhaustive, cascade with shortlist ``k``) :class:`EvaluationCost` of a ``SearchProtocol``
    on the given queries (all by default)."""
    indices = range(len(protocol)) if query_indices is None else query_indices
    sizes = [len(dict.fromkeys(protocol.gallery(i).images)) for i in indices]
    images = len(protocol.gallery_images(list(indices)))
    return exhaustive_cost(sizes), cascade_cost(sizes, k, images)
