"""Test-time batches of equal-size inputs, so that results do not depend on batch composition.

The images of a batch are padded to a common canvas, and every convolution of the backbone (and
of res5 on boxes near the border) sees that padding: an image scored next to a larger one gets
other proposals, detections and embeddings than scored alone. At test time the inputs of one
forward pass are therefore always of one size:

- gallery image (and query box, agnostic mode): its size after the test resize;
- pair: the gallery image's size AND the query image's size after the test resize (a pair's own
  gallery/query padding is a property of the pair, not of the batch).

Sizes after the resize are computed from the records' original ``height`` / ``width`` with
Detectron2's ``ResizeShortestEdge.get_output_shape`` (``INPUT.MIN_SIZE_TEST`` /
``INPUT.MAX_SIZE_TEST``), without reading the images.

:class:`SizeGroupedInferenceBatchSampler` forms the batches deterministically from the records
alone (so every rank of a distributed evaluation forms the batches a single process would) and
gives each rank a contiguous run of whole batches, as Detectron2's ``InferenceSampler`` does with
indices.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Hashable, Iterator, List, Mapping, Sequence, Tuple

from detectron2.data.samplers import InferenceSampler
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.utils import comm
from torch.utils.data import Sampler

from ..utils.records import record_kind

__all__ = [
    "resized_test_shape",
    "record_size_key",
    "size_grouped_batches",
    "SizeGroupedInferenceBatchSampler",
    "group_by_shape",
]


def resized_test_shape(height: int, width: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """(height, width) of an image after the test resize (``ResizeShortestEdge`` with short side
    ``min_size`` capped by ``max_size``; ``min_size`` 0 = no resize)."""
    if min_size == 0:
        return int(height), int(width)
    return ResizeShortestEdge.get_output_shape(int(height), int(width), min_size, max_size)


def record_size_key(record: Mapping, min_size: int, max_size: int) -> Tuple:
    """What must be equal for two test records to share a forward pass.

    Args:
        record: a test record (see :mod:`qeeps_d2.data.search_inputs`) with ``height`` /
            ``width`` (and, for a pair, ``query_height`` / ``query_width``), original pixels.
    Returns:
        ``("gallery", (h, w))``, ``("query", (h, w))`` or ``("pair", (h, w), (hq, wq))``, sizes
        after the test resize.
    """
    shape = resized_test_shape(record["height"], record["width"], min_size, max_size)
    kind = record_kind(record)
    if kind == "pair":
        query = resized_test_shape(record["query_height"], record["query_width"], min_size, max_size)
        return (kind, shape, query)
    return (kind, shape)


def size_grouped_batches(keys: Sequence[Hashable], batch_size: int) -> List[List[int]]:
    """Cut records into batches of at most ``batch_size`` records that share one key.

    The records of a key keep their order and are cut into consecutive batches; the batches are
    listed by their first record's position (so the order stays close to the records' order).
    A pure function of ``keys``: every process forms the same batches.

    Args:
        keys: (N,) hashable key per record, e.g. :func:`record_size_key`.
        batch_size: >= 1.
    Returns:
        list of batches, each a list of record indices; every index exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    groups: Dict[Hashable, List[int]] = OrderedDict()
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    batches = [members[start : start + batch_size]
               for members in groups.values() for start in range(0, len(members), batch_size)]
    return sorted(batches, key=lambda batch: batch[0])


class SizeGroupedInferenceBatchSampler(Sampler):
    """Batch sampler of a test loader: the batches of :func:`size_grouped_batches`, each rank a
    contiguous run of whole batches (Detectron2's ``InferenceSampler`` split, applied to
    batches): every record exactly once over all ranks, and every rank runs exactly the batches
    a single process would, so a distributed evaluation gives the single-process outputs.

    Args:
        keys: (N,) key per record (records of one batch share it).
        batch_size: records per batch at most.
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int):
        self.batches = size_grouped_batches(keys, batch_size)
        shard = InferenceSampler._get_local_indices(
            len(self.batches), comm.get_world_size(), comm.get_rank()
        )
        self._local = self.batches[shard.start : shard.stop]

    def __iter__(self) -> Iterator[List[int]]:
        yield from (list(batch) for batch in self._local)

    def __len__(self) -> int:
        return len(self._local)


def group_by_shape(inputs: Sequence[Mapping]) -> List[List[int]]:
    """Positions of model inputs grouped by their tensors' shapes (``image`` and, for a pair,
    ``query_image``), in order of first appearance: the forward passes that keep a stream of
    mapped inputs free of cross-input padding (``qeeps-search``)."""
    groups: Dict[Tuple, List[int]] = OrderedDict()
    for i, x in enumerate(inputs):
        key = (tuple(x["image"].shape),
               tuple(x["query_image"].shape) if "query_image" in x else None)
        groups.setdefault(key, []).append(i)
    return list(groups.values())
