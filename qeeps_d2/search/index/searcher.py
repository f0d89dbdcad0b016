"""Loading and searching a complete index: :func:`load_index` reads its rows into an
:class:`IndexData`, :class:`IndexSearcher` answers top-k queries with FAISS (exact inner product,
or the stored HNSW index of a large index), :func:`read_frames` reads frames back from the
index's source. Numpy and FAISS only (no torch). The format: :mod:`qeeps_d2.search.index`."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..gallery import iter_gallery, read_image_bgr
from .manifest import (
    APPROXIMATE_MIN_DETECTIONS,
    HNSW_EF_SEARCH,
    IndexIncomplete,
    load_fields,
    read_manifest,
)

__all__ = ["IndexData", "IndexMatch", "IndexSearcher", "load_index", "read_frames"]

logger = logging.getLogger(__name__)


@dataclass
class IndexData:
    """A complete index in memory (rows in gallery order).

    Attributes:
        manifest: its manifest.
        positions: (N,) int32 frame position of each detection.
        boxes: (N, 4) float32; scores: (N,) float32.
        embeddings: (N, D) float32 (float16 indexes are widened); None when read without
            them, and once an :class:`IndexSearcher` that read the index itself moved them
            into FAISS.
        frames: the name of each position; every: the source's frame step.
        index_dir: the folder it was read from.
    """

    index_dir: str
    manifest: Dict
    positions: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    embeddings: Optional[np.ndarray]
    frames: List[str] = field(repr=False)
    every: int = 1

    def frame_index(self, position: int) -> int:
        """The frame index (``qeeps-search``'s) of a position."""
        return int(position) * self.every


def load_index(index_dir: str, embeddings: bool = True) -> IndexData:
    """Read a complete index (without its embeddings: ``embeddings`` False).

    Raises:
        FileNotFoundError: no index there.
        IndexIncomplete: its build has not finished.
    """
    manifest = read_manifest(index_dir)
    if manifest["status"] != "complete":
        raise IndexIncomplete(f"index {index_dir} is still being built (or was interrupted): "
                              "run qeeps-index again to finish it")
    fields = load_fields(index_dir, manifest["chunks"], manifest, embeddings)
    return IndexData(
        index_dir=index_dir,
        manifest=manifest,
        positions=fields["position"],
        boxes=fields["box"],
        scores=fields["score"],
        embeddings=fields.get("embedding"),
        frames=list(manifest["frames"]),
        every=int(manifest["source"]["every"]),
    )


@dataclass
class IndexMatch:
    """A detection of the index scored against a query (the fields of
    :class:`~qeeps_d2.search.Match`, plus ``position`` and ``row``)."""

    frame: str
    index: int
    box: Tuple[float, float, float, float]
    det_score: float
    similarity: float
    position: int
    row: int


class IndexSearcher:
    """Top-k search of a complete index with FAISS.

    Example::

        searcher = IndexSearcher("output/index")
        for m in searcher.search(query_embedding, topk=10):
            print(m.frame, m.box, m.similarity)
    """

    def __init__(self, index: "str | IndexData", det_thresh: Optional[float] = None,
                 approximate: Optional[bool] = None, ef_search: int = HNSW_EF_SEARCH):
        """
        Args:
            index: an index folder, or its :class:`IndexData`.
            det_thresh: keep detections scoring at least this (None: the index's own; lower
                than the index's is an error, those detections are not stored).
            approximate: search the stored HNSW index (None: when the index has one).
            ef_search: HNSW candidates per search (recall vs latency).

        Raises:
            ValueError: ``det_thresh`` below the index's; ``approximate`` True for an index
                without an HNSW index.
        """
        import faiss

        own = not isinstance(index, IndexData)
        if own:  # the stored HNSW index holds its own vectors
            manifest = read_manifest(index)
            use_stored = approximate if approximate is not None else bool(
                manifest.get("approximate"))
            index = load_index(index, embeddings=not use_stored)
        self.data = index
        manifest = self.data.manifest
        self.embed_dim = int(manifest["embed_dim"])
        stored = manifest["det_thresh"]
        if det_thresh is not None and stored is not None and det_thresh < stored:
            raise ValueError(f"detection threshold {det_thresh} is below the index's {stored}: "
                             "it does not store those detections (build it with "
                             f"--confidence-threshold {det_thresh})")
        self.det_thresh = stored if det_thresh is None else float(det_thresh)
        approx = manifest.get("approximate")
        if approximate is None:
            approximate = approx is not None
        if approximate and approx is None:
            raise ValueError(f"index has no approximate index (it holds "
                             f"{manifest['num_detections']} detections; "
                             f"one is built from {APPROXIMATE_MIN_DETECTIONS} on)")
        self.approximate = bool(approximate)
        kept = (np.ones(len(self.data.scores), bool) if self.det_thresh is None
                else self.data.scores >= self.det_thresh)
        self.num_detections = int(kept.sum())
        self._params = None
        if self.approximate:
            self._index = faiss.read_index(os.path.join(self.data.index_dir, approx["file"]))
            self._rows = None  # FAISS ids are rows
            self._params = faiss.SearchParametersHNSW()
            self._params.efSearch = int(ef_search)
            if self.num_detections < len(kept):
                self._selector = faiss.IDSelectorBatch(np.flatnonzero(kept).astype(np.int64))
                self._params.sel = self._selector
        else:
            if self.data.embeddings is None:
                raise ValueError("exact search needs the embeddings: load_index(..., "
                                 "embeddings=True)")
            self._index = faiss.IndexFlatIP(self.embed_dim)
            if self.num_detections == len(kept):  # FAISS ids are rows
                self._rows = None
                self._index.add(np.ascontiguousarray(self.data.embeddings, dtype=np.float32))
            else:
                self._rows = np.flatnonzero(kept)
                self._index.add(np.ascontiguousarray(self.data.embeddings[self._rows]))
        if own:  # FAISS holds the vectors now
            self.data.embeddings = None

    @property
    def ef_search(self) -> Optional[int]:
        """HNSW candidates per search (None for the exact search); settable."""
        return None if self._params is None else int(self._params.efSearch)

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if self._params is None:
            raise ValueError("ef_search applies to the approximate (HNSW) search")
        self._params.efSearch = int(value)

    def _search(self, query: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """(similarities, rows) of the ``n`` best detections, similarity descending, ties in
        gallery order."""
        query = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
        if query.shape[1] != self.embed_dim:
            raise ValueError(f"query embedding has {query.shape[1]} values, the index's "
                             f"{self.embed_dim}")
        norm = float(np.linalg.norm(query))
        if not abs(norm - 1.0) < 1e-3:  # inner products would not be cosine similarities
            raise ValueError(f"query embedding is not L2-normalised (norm {norm:.4g})")
        n = min(n, self.num_detections)
        if n <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        # a few more than asked, so that ties at the cut are decided by gallery order
        want = min(n + 16, self.num_detections)
        sims, ids = (self._index.search(query, want, params=self._params) if self._params
                     else self._index.search(query, want))
        sims, ids = sims[0], ids[0]
        valid = ids >= 0
        sims, ids = sims[valid], ids[valid]
        rows = ids if self._rows is None else self._rows[ids]
        order = np.lexsort((rows, -sims))[:n]
        return sims[order], rows[order]

    def _match(self, row: int, similarity: float) -> IndexMatch:
        d = self.data
        p = int(d.positions[row])
        return IndexMatch(d.frames[p], d.frame_index(p), tuple(float(v) for v in d.boxes[row]),
                          float(d.scores[row]), float(similarity), p, int(row))

    def search(self, query: np.ndarray, topk: int = 10) -> List[IndexMatch]:
        """The ``topk`` detections most similar to the (D,) L2-normalised ``query`` embedding
        (score >= ``det_thresh``), similarity descending (ties: gallery order)."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        sims, rows = self._search(query, topk)
        return [self._match(r, s) for s, r in zip(sims, rows)]

    def best_frames(self, query: np.ndarray, k: int, topk: int = 10) -> List[IndexMatch]:
        """What a cascade over the index needs: the best matches, similarity descending (ties:
        gallery order), deep enough to cover ``k`` distinct frames (the ``k`` frames with the
        best matches: the first ``k`` met) and ``topk`` matches of other frames, or the whole
        index."""
        if k < 1 or topk < 1:
            raise ValueError(f"k and topk must be >= 1, got {k}, {topk}")
        n = 4 * (k + topk)
        while True:
            sims, rows = self._search(query, n)
            positions = self.data.positions[rows]
            first = list(dict.fromkeys(positions.tolist()))[:k]
            others = int(np.count_nonzero(~np.isin(positions, first)))
            if (len(first) >= k and others >= topk) or n >= self.num_detections:
                return [self._match(r, s) for s, r in zip(sims, rows)]
            n *= 4


def read_frames(data: IndexData, positions: Sequence[int]) -> Dict[int, np.ndarray]:
    """The (H, W, 3) uint8 BGR frames at ``positions``, read back from the index's source (a
    video is read once, from the first wanted frame to the last; images that cannot be read any
    more are left out)."""
    source = data.manifest["source"]
    wanted = sorted(set(int(p) for p in positions))
    frames: Dict[int, np.ndarray] = {}
    if not wanted:
        return frames
    if source["kind"] == "folder":
        for p in wanted:
            try:
                frames[p] = read_image_bgr(os.path.join(source["path"], data.frames[p]))
            except (OSError, ValueError) as e:
                logger.warning("%s: left out of the report", e)
        return frames
    gallery = iter_gallery(source["path"], data.every, start=wanted[0],
                           max_frames=wanted[-1] - wanted[0] + 1)
    keep = set(wanted)
    for frame in gallery:
        p = frame.index // data.every
        if p in keep:
            frames[p] = frame.image
    return frames
