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
    pids_in = []  # image index -> the labeled ids it holds
    for i, d in enumerate(dataset_dicts):
        pids = sorted({a["person_id"] for a in d.get("annotations", []) if a["person_id"] >= 0})
        pids_in.append(np.asarray(pids, dtype=np.int64))
        for pid in pids:
            images_of[pid].append(i)
    hardness = None
    if negatives_per_query > 0 and pid_similarity is not None:
        sim = np.asarray(pid_similarity, dtype=np.float64)
        top = max(max(images_of, default=-1), 0)
        if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] <= top:
            raise ValueError(f"pid_similarity must be (P, P) with P > {top} (the largest person "
                             f"id), got shape {sim.shape}")
        # (P, num_images): similarity of each id to the most similar id an image holds
        hardness = np.stack([sim[:, p].max(axis=1) if len(p) else np.full(len(sim), -np.inf)
                             for p in pids_in], axis=1)
    records = []
    for q_idx, q in enumerate(dataset_dicts):
        for ann in q.get("annotations", []):
            pid = ann["person_id"]
            if pid < 0:
                continue
            galleries = [g for g in images_of[pid] if g != q_idx]
            if galleries_per_query > 0 and len(galleries) > galleries_per_query:
                galleries = sorted(rng.choice(galleries, galleries_per_query, replace=False))
            negatives = _negative_images(pid, q_idx, images_of, len(dataset_dicts),
                                         negatives_per_query, hardness, hard_pool, rng)
            for g in list(galleries) + negatives:
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


def _negative_images(pid: int, q_idx: int, images_of, num_images: int, k: int,
                     hardness: Optional[np.ndarray], hard_pool: int, rng) -> List[int]:
    """Up to k indices of images that hold no box of ``pid`` (nor are the query's own image)."""
    if k <= 0:
        return []
    excluded = set(images_of[pid]) | {q_idx}
    candidates = np.asarray([i for i in range(num_images) if i not in excluded], dtype=np.int64)
    if hardness is not None and len(candidates):
        order = np.argsort(-hardness[pid, candidates], kind="stable")
        candidates = candidates[order[: hard_pool * k]]
    if len(candidates) <= k:
        return sorted(candidates.tolist())
    return sorted(rng.choice(candidates, k, replace=False).tolist())
