"""Query-gallery training pairs (paper Sec. 4.4 and 5.2), as flat records for the mapper."""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np

__all__ = ["build_pair_records"]

logger = logging.getLogger(__name__)


def build_pair_records(
    dataset_dicts: List[Dict], galleries_per_query: int = -1, seed: int = 0,
    negatives_per_query: int = 0, pid_similarity: Optional[np.ndarray] = None,
    hard_pool: int = 4,
) -> List[Dict]:
    """Every labeled person box as a query, paired with gallery images holding the same id
    (positive pairs, the paper's) and optionally with images that do not hold it (negative
    pairs: every person there is a QSimNet negative, as in a search's shortlist).

    Args:
        dataset_dicts: Detectron2 dicts whose annotations carry ``person_id`` (>= 0 labeled).
        galleries_per_query: gallery images per query; -1 = all of them (CUHK-SYSU recipe),
            k > 0 = k of them drawn without replacement (PRW uses 3).
        seed: seed of the draws (the pair list is deterministic per seed).
        negatives_per_query: images without the query's id paired with each query box.
        pid_similarity: (P, P) similarity of the labeled ids (e.g. cosine of a trained OIM
            table's rows), or None. With it, an image's hardness for query id p is the largest
            similarity of p to an id the image holds, and the negatives are drawn from the
            ``hard_pool * negatives_per_query`` hardest images; without it, from all of them.
        hard_pool: see ``pid_similarity``.
    Returns:
        records: the gallery image's dict (annotations included) plus ``query_file_name``,
        ``query_image_id``, ``query_box`` (XYXY, original pixels) and ``query_pid``.
    """
    rng = np.random.RandomState(seed)
    images_of = defaultdict(list)  # pid -> indices of images holding it (each image once)
    for i, d in enumerate(dataset_dicts):
        for pid in sorted({a["person_id"] for a in d.get("annotations", []) if a["person_id"] >= 0}):
            images_of[pid].append(i)
    negatives_of = _NegativeImages(images_of, len(dataset_dicts), negatives_per_query,
                                   pid_similarity, hard_pool)
    records = []
    for q_idx, q in enumerate(dataset_dicts):
        for ann in q.get("annotations", []):
            pid = ann["person_id"]
            if pid < 0:
                continue
            galleries = [g for g in images_of[pid] if g != q_idx]
            if galleries_per_query > 0 and len(galleries) > galleries_per_query:
                galleries = sorted(rng.choice(galleries, galleries_per_query, replace=False))
            for g in list(galleries) + negatives_of(pid, rng):
                record = dict(dataset_dicts[g])
                record.update(
                    query_file_name=q["file_name"],
                    query_image_id=q.get("image_id"),
                    query_box=list(map(float, ann["bbox"])),
                    query_pid=int(pid),
                )
                records.append(record)
    if not records:
        raise ValueError(
            "no query-gallery training pairs: no labeled identity appears in two images"
        )
    logger.info("Built %d query-gallery pairs from %d images", len(records), len(dataset_dicts))
    return records


class _NegativeImages:
    """``negatives(pid, rng)``: the indices (sorted) of up to k images that hold no box of id
    ``pid`` (so neither the query's own image), drawn with ``rng``: from all such images, or
    from the ``hard_pool * k`` whose most similar id is most similar to ``pid``."""

    def __init__(self, images_of: Dict[int, List[int]], num_images: int, k: int,
                 pid_similarity: Optional[np.ndarray], hard_pool: int):
        self.images_of, self.num_images, self.k = images_of, num_images, k
        self.sim = None
        self.pools: Dict[int, np.ndarray] = {}  # pid -> its hard pool (hard mode)
        if k <= 0 or pid_similarity is None:
            return
        if hard_pool < 1:
            raise ValueError(f"hard_pool must be >= 1, got {hard_pool}")
        self.sim = np.asarray(pid_similarity, dtype=np.float64)
        top = max(max(images_of, default=-1), 0)
        if self.sim.ndim != 2 or self.sim.shape[0] != self.sim.shape[1] or len(self.sim) <= top:
            raise ValueError(f"pid_similarity must be (P, P) with P > {top} (the largest person "
                             f"id), got shape {self.sim.shape}")
        # one (image, id) entry per image holding a labeled id
        pairs = [(i, pid) for pid, images in images_of.items() for i in images]
        self.entry_image = np.asarray([i for i, _ in pairs], dtype=np.int64)
        self.entry_pid = np.asarray([p for _, p in pairs], dtype=np.int64)
        self.pool_size = hard_pool * k

    def _candidates(self, pid: int) -> np.ndarray:
        without = np.ones(self.num_images, dtype=bool)
        without[self.images_of[pid]] = False
        candidates = np.flatnonzero(without)
        if self.sim is None:
            return candidates
        if pid not in self.pools:
            hardness = np.full(self.num_images, -np.inf)  # similarity of its most similar id
            np.maximum.at(hardness, self.entry_image, self.sim[pid, self.entry_pid])
            order = np.argsort(-hardness[candidates], kind="stable")
            self.pools[pid] = candidates[order[: self.pool_size]]
        return self.pools[pid]

    def __call__(self, pid: int, rng) -> List[int]:
        if self.k <= 0:
            return []
        candidates = self._candidates(pid)
        if len(candidates) <= self.k:
            return sorted(candidates.tolist())
        return sorted(rng.choice(candidates, self.k, replace=False).tolist())
