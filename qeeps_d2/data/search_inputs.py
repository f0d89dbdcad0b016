"""Test-time records of a search protocol: what the model must see to be evaluated (numpy only).

Two modes, matching the two kinds of models:

* ``"agnostic"`` (OIM baseline, query-independent detection and re-id): every distinct gallery
  image once, ``{"file_name", "image_id"}``, and every query once,
  ``{"file_name", "image_id", "query_box", "query_index"}``; the evaluator ranks gallery
  detections by ``pred_embeds @ query_embed``.
* ``"pairs"`` (query-guided models): one record per (query, distinct image of its gallery),
  ``{"file_name", "image_id", "query_file_name", "query_image_id", "query_box", "query_index"}``,
  ordered query by query (and gallery order within a query), so that consecutive records share
  one query. A ``shortlist`` (query index -> images, the cascade's second stage) restricts each
  query's pairs to those images (still in gallery order).

``file_name`` is ``os.path.join(protocol.image_root, name)``; ``image_id`` is the image's base
name as used in the protocol and the results file; ``query_box`` is [x1, y1, x2, y2] in original
image pixels. Height and width are left to the caller (the test loader adds them to batch equal
sizes) or to the mapper, which reads the image.

With ``gallery_boxes`` (image name -> (M, 4) boxes, evaluation with ground-truth boxes) every
gallery-image record and every pair record also carries ``"given_boxes"``: its gallery image's
boxes, a list of [x1, y1, x2, y2] in original image pixels, which the model scores instead of
detecting.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..data.search_protocol import SearchProtocol

__all__ = ["SEARCH_MODES", "build_search_records", "check_query_indices"]

SEARCH_MODES = ("agnostic", "pairs")


def check_query_indices(
    protocol: SearchProtocol, query_indices: Optional[Sequence[int]]
) -> List[int]:
    """The sorted distinct query indices to evaluate (all when None); ValueError if out of range."""
    if query_indices is None:
        return list(range(len(protocol)))
    indices = sorted(set(int(i) for i in query_indices))
    bad = [i for i in indices if not 0 <= i < len(protocol)]
    if bad:
        raise ValueError(
            f"query index {bad[0]} out of range for protocol {protocol.name} "
            f"({len(protocol)} queries)"
        )
    return indices


def _query_record(protocol: SearchProtocol, index: int) -> Dict:
    q = protocol.queries[index]
    return {
        "file_name": os.path.join(protocol.image_root, q.image),
        "image_id": q.image,
        "query_box": [float(v) for v in q.box],
        "query_index": index,
    }


def build_search_records(
    protocol: SearchProtocol,
    mode: str,
    query_indices: Optional[Sequence[int]] = None,
    shortlist: Optional[Mapping[int, Sequence[str]]] = None,
    gallery_boxes: Optional[Mapping[str, Sequence[Sequence[float]]]] = None,
) -> List[Dict]:
    """Records for evaluating ``protocol`` on the given queries (all by default).

    Args:
        protocol: the search protocol.
        mode: ``"agnostic"`` or ``"pairs"`` (see the module docstring).
        query_indices: the queries to evaluate (partial evaluation), default all.
        shortlist: pairs mode only: query index -> the gallery images to pair it with (a query
            missing from it gets no pair); None = every image of its gallery.

    Returns:
        agnostic: the gallery-image records (sorted by name), then the query records (by index);
        pairs: the pair records, query by query.
    """
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown search mode {mode!r}; expected one of {SEARCH_MODES}")
    if shortlist is not None and mode != "pairs":
        raise ValueError("a shortlist restricts pair records; it needs mode 'pairs'")
    indices = check_query_indices(protocol, query_indices)
    root = protocol.image_root

    def given(name: str) -> Dict:
        if gallery_boxes is None:
            return {}
        if name not in gallery_boxes:
            raise ValueError(f"no given boxes for gallery image {name!r}")
        boxes = np.asarray(gallery_boxes[name], dtype=np.float64).reshape(-1, 4)
        return {"given_boxes": boxes.tolist()}

    if mode == "agnostic":
        gallery = [
            {"file_name": os.path.join(root, name), "image_id": name, **given(name)}
            for name in protocol.gallery_images(indices)
        ]
        return gallery + [_query_record(protocol, i) for i in indices]
    records = []
    for i in indices:
        query = _query_record(protocol, i)
        pair_base = {
            "query_file_name": query["file_name"],
            "query_image_id": query["image_id"],
            "query_box": query["query_box"],
            "query_index": i,
        }
        wanted = None if shortlist is None else set(shortlist.get(i, ()))
        for name in dict.fromkeys(protocol.gallery(i).images):  # distinct, in gallery order
            if wanted is not None and name not in wanted:
                continue
            records.append(
                {"file_name": os.path.join(root, name), "image_id": name, **pair_base,
                 "query_box": list(query["query_box"]), **given(name)}
            )
    return records
