"""Train and test data loaders for person search, built from a config."""
from __future__ import annotations

import logging
from typing import List, Optional

from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)

from .mapper import PersonSearchMapper
from .pairs import build_pair_records

__all__ = [
    "uses_pairs",
    "cascade_topk",
    "build_person_search_train_loader",
    "build_person_search_test_loader",
    "load_test_protocol",
    "evaluated_queries",
]

logger = logging.getLogger(__name__)


def uses_pairs(cfg) -> bool:
    """Whether the model is query-guided (trained on pairs, searched pair by pair)."""
    q = cfg.MODEL.QEEPS
    return q.QSSE.ENABLED or q.QRPN.ENABLED or q.QSIMNET.ENABLED


def cascade_topk(cfg) -> int:
    """Shortlist length K of cascade evaluation (TEST.PERSON_SEARCH.CASCADE_TOPK) for a
    query-guided model; 0 = exhaustive pair evaluation (always 0 for query-agnostic models)."""
    k = cfg.TEST.PERSON_SEARCH.CASCADE_TOPK
    if k < 0:
        raise ValueError(f"TEST.PERSON_SEARCH.CASCADE_TOPK must be >= 0, got {k}")
    if k and not uses_pairs(cfg):
        logger.warning("TEST.PERSON_SEARCH.CASCADE_TOPK %d ignored: the model is query-agnostic "
                       "(it already runs each gallery image once)", k)
        return 0
    return k


def build_person_search_train_loader(cfg):
    """Scene images with person ids (OIM baseline) or query-gallery pairs (query-guided)."""
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=True)
    if uses_pairs(cfg):
        dicts = build_pair_records(
            dicts, cfg.DATALOADER.PAIRS.GALLERIES_PER_QUERY, seed=cfg.SEED if cfg.SEED >= 0 else 0
        )
    return build_detection_train_loader(
        cfg, mapper=PersonSearchMapper(cfg, is_train=True), dataset=dicts
    )


def load_test_protocol(cfg, dataset_name: str):
    """The data set's search protocol with the config's gallery size / camera setting."""
    from .catalog import load_protocol

    ps = cfg.TEST.PERSON_SEARCH
    return load_protocol(dataset_name, gallery_size=ps.GALLERY_SIZE, cross_camera=ps.CROSS_CAMERA)


def evaluated_queries(cfg, protocol) -> Optional[List[int]]:
    """Indices of the queries to evaluate (None = all; TEST.PERSON_SEARCH.MAX_QUERIES)."""
    k = cfg.TEST.PERSON_SEARCH.MAX_QUERIES
    return list(range(min(k, len(protocol)))) if k > 0 else None


def build_person_search_test_loader(
    cfg, dataset_name: str, protocol=None, mode: Optional[str] = None, shortlist=None
):
    """Records of the protocol (gallery images + query boxes, or pairs) through the mapper.

    Args:
        mode: ``"agnostic"`` or ``"pairs"``; None = the model's own (``uses_pairs``). The
            cascade's first stage asks for ``"agnostic"`` with a query-guided model.
        shortlist: pairs only: query index -> the gallery images to pair it with (the
            cascade's second stage); None = whole galleries.
    """
    from qeeps_d2.evaluation.search_inputs import build_search_records

    protocol = protocol if protocol is not None else load_test_protocol(cfg, dataset_name)
    mode = mode or ("pairs" if uses_pairs(cfg) else "agnostic")
    records = build_search_records(protocol, mode, evaluated_queries(cfg, protocol), shortlist)
    logger.info("%s: %d %s records%s", dataset_name, len(records), mode,
                "" if shortlist is None else " (cascade shortlist)")
    return build_detection_test_loader(
        dataset=records,
        mapper=PersonSearchMapper(cfg, is_train=False),
        batch_size=cfg.TEST.PERSON_SEARCH.BATCH_SIZE,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
