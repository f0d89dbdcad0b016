"""Training records and the test loader of a config."""
from __future__ import annotations

import logging
import os
import weakref
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch.utils.data as torchdata

from detectron2.data import DatasetCatalog, DatasetFromList, MapDataset, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator

from ..config import is_query_guided
from .dataset_dicts import detection_ground_truth
from .mapper import PersonSearchMapper
from .pairs import build_pair_records
from .search_inputs import build_search_records
from .size_batching import SizeGroupedInferenceBatchSampler, record_size_key

__all__ = [
    "train_image_records",
    "build_train_records",
    "build_person_search_test_loader",
    "gallery_gt_boxes",
    "load_test_protocol",
    "evaluated_queries",
]

logger = logging.getLogger(__name__)

# cfg object -> its training records, built once per config (epoch schedule, loader, OIM table
# initialisation all ask); an entry goes with its config
_RECORDS: Dict[int, Tuple[weakref.ref, Dict[str, List[Dict]]]] = {}


def _records_of(cfg) -> Dict[str, List[Dict]]:
    key = id(cfg)
    entry = _RECORDS.get(key)
    if entry is None or entry[0]() is not cfg:
        entry = (weakref.ref(cfg, lambda _, key=key: _RECORDS.pop(key, None)), {})
        _RECORDS[key] = entry
    return entry[1]


def train_image_records(cfg) -> List[Dict]:
    """The training scene images that hold persons (Detectron2 dataset dicts of
    ``DATASETS.TRAIN``), built once per config object."""
    cache = _records_of(cfg)
    if "images" not in cache:
        cache["images"] = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=True)
    return cache["images"]


def build_train_records(cfg) -> List[Dict]:
    """The training records, built once per config object: the scene images (OIM baseline) or
    the query-gallery pairs built from them (query-guided models, :mod:`.pairs`)."""
    cache = _records_of(cfg)
    if "train" not in cache:
        images = train_image_records(cfg)
        pairs = cfg.DATALOADER.PAIRS
        cache["train"] = (
            build_pair_records(images, pairs.GALLERIES_PER_QUERY,
                               seed=cfg.SEED if cfg.SEED >= 0 else 0,
                               negatives_per_query=pairs.NEGATIVES_PER_QUERY,
                               pid_similarity=_negative_pair_similarity(cfg),
                               hard_pool=pairs.HARD_POOL)
            if is_query_guided(cfg) else images
        )
    return cache["train"]


def _negative_pair_similarity(cfg) -> Optional[np.ndarray]:
    """(P, P) cosine similarity of the OIM table rows of ``MODEL.WEIGHTS`` when the config
    mines hard negative pairs from it (``DATALOADER.PAIRS.NEGATIVES "oim_table"``), else None."""
    pairs = cfg.DATALOADER.PAIRS
    if pairs.NEGATIVES not in ("random", "oim_table"):
        raise ValueError(f'DATALOADER.PAIRS.NEGATIVES must be "random" or "oim_table", '
                         f"got {pairs.NEGATIVES!r}")
    if pairs.NEGATIVES_PER_QUERY < 0:
        raise ValueError(f"DATALOADER.PAIRS.NEGATIVES_PER_QUERY must be >= 0 (0 = off), got "
                         f"{pairs.NEGATIVES_PER_QUERY}")
    if pairs.NEGATIVES_PER_QUERY == 0 or pairs.NEGATIVES == "random":
        return None
    from ..checkpoint import read_weights

    key = "roi_heads.oim_loss.lut"
    table = read_weights(cfg.MODEL.WEIGHTS).get(key)
    if table is None:
        raise ValueError(f'DATALOADER.PAIRS.NEGATIVES "oim_table" needs an OIM table ({key}) in '
                         f"MODEL.WEIGHTS ({cfg.MODEL.WEIGHTS}): fine-tune from a trained model")
    table = np.asarray(table, dtype=np.float64)
    table /= np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    logger.info("Hard negative pairs mined from the OIM table of %s", cfg.MODEL.WEIGHTS)
    return table @ table.T


def load_test_protocol(cfg, dataset_name: str):
    """The data set's search protocol with the config's gallery size / camera setting."""
    from .datasets.catalog import load_protocol

    ps = cfg.TEST.PERSON_SEARCH
    return load_protocol(dataset_name, gallery_size=ps.GALLERY_SIZE, cross_camera=ps.CROSS_CAMERA)


def evaluated_queries(cfg, protocol) -> Optional[List[int]]:
    """Indices of the queries to evaluate (None = all; TEST.PERSON_SEARCH.MAX_QUERIES)."""
    k = cfg.TEST.PERSON_SEARCH.MAX_QUERIES
    return list(range(min(k, len(protocol)))) if k > 0 else None


def _image_sizes(dataset_name: str, names, image_root: str) -> Dict[str, Tuple[int, int]]:
    """image name -> (height, width) in original pixels: from the data set's dicts, else (an
    image the dicts do not hold) from the file's header."""
    from PIL import Image

    sizes = {d["image_id"]: (int(d["height"]), int(d["width"]))
             for d in DatasetCatalog.get(dataset_name) if "height" in d and "width" in d}
    for name in set(names) - set(sizes):
        with Image.open(os.path.join(image_root, name)) as image:
            sizes[name] = (image.height, image.width)
    return sizes


def gallery_gt_boxes(dataset_name: str, images) -> Dict[str, np.ndarray]:
    """image name -> (M, 4) float64 XYXY annotated person boxes (original pixels) of each of
    ``images``, from the data set's dicts (TEST.PERSON_SEARCH.USE_GT_BOXES).

    Raises:
        ValueError: an image the data set's dicts do not hold (its boxes are unknown).
    """
    wanted = set(images)
    ground_truth = detection_ground_truth(DatasetCatalog.get(dataset_name), wanted)
    missing = sorted(wanted - set(ground_truth))
    if missing:
        raise ValueError(f"{dataset_name}: TEST.PERSON_SEARCH.USE_GT_BOXES needs the annotated "
                         f"boxes of every gallery image; {len(missing)} are not in the data "
                         f"set's dicts (e.g. {missing[0]})")
    return {name: boxes for name, (boxes, _) in ground_truth.items()}


def build_person_search_test_loader(
    cfg, dataset_name: str, protocol=None, mode: Optional[str] = None, shortlist=None
):
    """Records of the protocol (gallery images + query boxes, or pairs) through the mapper, in
    batches of at most ``TEST.PERSON_SEARCH.BATCH_SIZE`` records of one size after the test
    resize (:mod:`qeeps_d2.data.size_batching`: results do not depend on batch composition).

    Args:
        mode: ``"agnostic"`` or ``"pairs"``; None = the model's own (``is_query_guided``). The
            cascade's first stage asks for ``"agnostic"`` with a query-guided model.
        shortlist: pairs only: query index -> the gallery images to pair it with (the
            cascade's second stage); None = whole galleries.

    With ``TEST.PERSON_SEARCH.USE_GT_BOXES`` every gallery-image and pair record carries its
    image's annotated boxes as ``given_boxes`` (the model scores those instead of detecting).
    """
    protocol = protocol if protocol is not None else load_test_protocol(cfg, dataset_name)
    mode = mode or ("pairs" if is_query_guided(cfg) else "agnostic")
    indices = evaluated_queries(cfg, protocol)
    gt_boxes = None
    if cfg.TEST.PERSON_SEARCH.USE_GT_BOXES:
        gt_boxes = gallery_gt_boxes(dataset_name, protocol.gallery_images(indices))
    records = build_search_records(protocol, mode, indices, shortlist, gallery_boxes=gt_boxes)
    sizes = _image_sizes(
        dataset_name, {r["image_id"] for r in records}
        | {r["query_image_id"] for r in records if "query_image_id" in r}, protocol.image_root,
    )
    for r in records:
        r["height"], r["width"] = sizes[r["image_id"]]
        if "query_image_id" in r:
            r["query_height"], r["query_width"] = sizes[r["query_image_id"]]
    batch_size = cfg.TEST.PERSON_SEARCH.BATCH_SIZE
    min_size, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    batch_sampler = SizeGroupedInferenceBatchSampler(
        [record_size_key(r, min_size, max_size) for r in records], batch_size
    )
    logger.info("%s: %d %s records%s%s in %d batches of one image size each", dataset_name,
                len(records), mode, "" if shortlist is None else " (cascade shortlist)",
                " with ground-truth boxes" if gt_boxes is not None else "",
                len(batch_sampler.batches))
    return torchdata.DataLoader(
        MapDataset(DatasetFromList(records, copy=False), PersonSearchMapper(cfg, is_train=False)),
        batch_sampler=batch_sampler,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator,
    )
