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


def build_person_search_test_loader(cfg, dataset_name: str, protocol=None):
    """Records of the protocol (gallery images + query boxes, or pairs) through the mapper."""
    from qeeps_d2.evaluation.search_inputs import build_search_records

    protocol = protocol if protocol is not None else load_test_protocol(cfg, dataset_name)
    mode = "pairs" if uses_pairs(cfg) else "agnostic"
    records = build_search_records(protocol, mode, evaluated_queries(cfg, protocol))
    logger.info("%s: %d %s records", dataset_name, len(records), mode)
    return build_detection_test_loader(
        dataset=records,
        mapper=PersonSearchMapper(cfg, is_train=False),
        batch_size=cfg.TEST.PERSON_SEARCH.BATCH_SIZE,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
