"""Train and test data loaders for person search, built from a config."""
from __future__ import annotations

import logging
from typing import List, Optional

from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import InferenceSampler

from .mapper import PersonSearchMapper
from .pairs import build_pair_records

__all__ = [
    "uses_pairs",
    "cascade_topk",
    "build_person_search_train_loader",
    "build_person_search_test_loader",
    "BatchAlignedInferenceSampler",
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


class BatchAlignedInferenceSampler(InferenceSampler):
    """Detectron2's ``InferenceSampler`` (contiguous shards, every record exactly once) with
    shard boundaries on multiples of ``batch_size``: each rank forms exactly the batches a single
    process would, so a distributed evaluation gives the single-process outputs bit for bit
    (the images of a batch are padded to a common size, and batch composition changes the
    floating-point results slightly)."""

    def __init__(self, size: int, batch_size: int):
        self._batch_size = int(batch_size)
        super().__init__(size)

    def _get_local_indices(self, total_size: int, world_size: int, rank: int) -> range:
        num_batches = -(-total_size // self._batch_size)
        batches = InferenceSampler._get_local_indices(num_batches, world_size, rank)
        return range(min(batches.start * self._batch_size, total_size),
                     min(batches.stop * self._batch_size, total_size))


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
    batch_size = cfg.TEST.PERSON_SEARCH.BATCH_SIZE
    return build_detection_test_loader(
        dataset=records,
        mapper=PersonSearchMapper(cfg, is_train=False),
        sampler=BatchAlignedInferenceSampler(len(records), batch_size),
        batch_size=batch_size,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
