"""Query-gallery training pairs (paper Sec. 4.4 and 5.2), as flat records for the mapper."""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Dict, List

import numpy as np

__all__ = ["build_pair_records"]

logger = logging.getLogger(__name__)


def build_pair_records(
    dataset_dicts: List[Dict], galleries_per_query: int = -1, seed: int = 0
) -> List[Dict]:
    """Every labeled person box as a query, paired with gallery images holding the same id.

    Args:
        dataset_dicts: Detectron2 dicts whose annotations carry ``person_id`` (>= 0 labeled).
        galleries_per_query: gallery images per query; -1 = all of them (CUHK-SYSU recipe),
            k > 0 = k of them drawn without replacement (PRW uses 3).
        seed: seed of that draw (the pair list is deterministic per seed).
    Returns:
        records: the gallery image's dict (annotations included) plus ``query_file_name``,
        ``query_image_id``, ``query_box`` (XYXY, original pixels) and ``query_pid``.
    """
    rng = np.random.RandomState(seed)
    images_of = defaultdict(list)  # pid -> indices of images holding it (each image once)
    for i, d in enumerate(dataset_dicts):
        for pid in sorted({a["person_id"] for a in d.get("annotations", []) if a["person_id"] >= 0}):
            images_of[pid].append(i)
    records = []
    for q_idx, q in enumerate(dataset_dicts):
        for ann in q.get("annotations", []):
            pid = ann["person_id"]
            if pid < 0:
                continue
            galleries = [g for g in images_of[pid] if g != q_idx]
            if galleries_per_query > 0 and len(galleries) > galleries_per_query:
                galleries = sorted(rng.choice(galleries, galleries_per_query, replace=False))
            for g in galleries:
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
