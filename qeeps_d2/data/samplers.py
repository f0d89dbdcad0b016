"""A training data stream that a resumed run replays exactly: batch ``i`` is a function of
``(seed, i)`` alone.

Detectron2's ``TrainingSampler`` is an infinite shuffled stream that restarts from its seed when
a run is resumed, its ``AspectRatioGroupedDataset`` keeps a buffer whose content depends on the
whole history, and its augmentations draw from the process-global numpy RNG (seeded per worker
at start). A run resumed at iteration ``k`` therefore sees other images, grouped and flipped
differently, than the uninterrupted run did. Here:

- :class:`ResumableBatchSampler` fixes, for every iteration ``i``, the global batch of dataset
  indices: epoch ``e = i // batches_per_epoch`` is a permutation seeded by ``(seed, e)``, split
  into aspect-ratio groups (landscape / portrait, from the records' ``width``/``height``), each
  group cut into batches of ``total_batch_size`` (the last one of a group topped up from the
  group's start), the batches shuffled. Rank ``r`` of ``W`` takes slice ``r`` of each batch.
- :class:`ResumableTrainLoader` maps batch ``i``'s records with the numpy and ``random`` RNGs
  seeded by ``(seed, i, position in batch)`` (restored afterwards, so the stream neither uses nor
  disturbs the global RNG state), and starts at the batch :meth:`~ResumableTrainLoader.start_at`
  sets. With ``num_workers`` > 0, worker ``w`` maps batches ``start + w, start + w + W, ...``;
  PyTorch's loader takes one result from each worker in turn, so the order is the same as with
  ``num_workers=0``.
- A record whose mapper returns ``None`` (an unreadable image, see
  :class:`~qeeps_d2.data.mapper.PersonSearchMapper`) is replaced by the next index of the data set
  that maps, deterministically.
"""
from __future__ import annotations

import logging
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = ["ResumableBatchSampler", "ResumableTrainLoader"]

logger = logging.getLogger(__name__)


def _aspect_groups(records: Sequence[Dict], group_by_aspect: bool) -> np.ndarray:
    """(N,) int group id per record: 1 for landscape (width > height), 0 otherwise; all 0
    without grouping or when a record has no ``width``/``height``."""
    if not group_by_aspect or any("width" not in r or "height" not in r for r in records):
        return np.zeros(len(records), dtype=np.int64)
    return np.array([int(r["width"] > r["height"]) for r in records], dtype=np.int64)


class ResumableBatchSampler:
    """Global batch ``i`` of dataset indices, a pure function of ``(seed, i)`` (module docstring).

    Args:
        groups: (N,) group id of each record (batches never mix groups).
        total_batch_size: indices per global batch (``SOLVER.IMS_PER_BATCH``), divisible by
            ``world_size``.
        seed: the stream's seed.
        rank, world_size: this process's slice of every global batch.
    """

    def __init__(self, groups: np.ndarray, total_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        groups = np.asarray(groups, dtype=np.int64)
        if len(groups) == 0:
            raise ValueError("the training set is empty: no record to sample")
        if total_batch_size < 1 or total_batch_size % world_size:
            raise ValueError(
                f"total batch size {total_batch_size} must be a positive multiple of the "
                f"number of processes ({world_size})"
            )
        self.groups = groups
        self.total_batch_size = int(total_batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        sizes = np.bincount(groups)
        self.batches_per_epoch = int(sum(-(-int(n) // self.total_batch_size) for n in sizes if n))
        self._cached_epoch: Optional[int] = None
        self._cached_batches: List[np.ndarray] = []

    def _epoch_batches(self, epoch: int) -> List[np.ndarray]:
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.groups))
            batches = []
            for g in np.unique(self.groups):
                members = order[self.groups[order] == g]
                pad = -len(members) % self.total_batch_size
                members = np.concatenate([members, np.resize(members, pad)])
                batches.extend(members.reshape(-1, self.total_batch_size))
            self._cached_batches = [batches[k] for k in rng.permutation(len(batches))]
            self._cached_epoch = epoch
        return self._cached_batches

    def global_batch(self, iteration: int) -> np.ndarray:
        """(total_batch_size,) dataset indices of batch ``iteration`` (all ranks together)."""
        epoch, position = divmod(int(iteration), self.batches_per_epoch)
        return self._epoch_batches(epoch)[position]

    def batch(self, iteration: int) -> List[int]:
        """This rank's dataset indices of batch ``iteration``."""
        per_rank = self.total_batch_size // self.world_size
        indices = self.global_batch(iteration)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [int(i) for i in indices]


def _sample_seed(seed: int, iteration: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, position]).generate_state(1)[0])


class _MappedBatches(IterableDataset):
    """Mapped batches ``start, start + 1, ...`` (this worker's share of them)."""

    def __init__(self, records: Sequence[Dict], mapper: Callable[[Dict], Optional[Dict]],
                 sampler: ResumableBatchSampler):
        self.records = records
        self.mapper = mapper
        self.sampler = sampler
        self.start = 0

    def __iter__(self) -> Iterator[List[Dict]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        iteration = self.start + worker
        while True:
            indices = self.sampler.batch(iteration)
            yield [self._map(iteration, j, index) for j, index in enumerate(indices)]
            iteration += num_workers

    def _map(self, iteration: int, position: int, index: int) -> Dict:
        """The mapped record ``index`` (or the next one that maps), with seeded augmentation."""
        np_state, py_state = np.random.get_state(), random.getstate()
        seed = _sample_seed(self.sampler.seed, iteration, position)
        try:
            np.random.seed(seed)
            random.seed(seed)
            n = len(self.records)
            for attempt in range(n):
                mapped = self.mapper(self.records[(index + attempt) % n])
                if mapped is not None:
                    return mapped
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        raise RuntimeError(f"none of the {n} training records could be mapped (all unreadable?)")


def _batch_as_is(batch):
    return batch


class ResumableTrainLoader:
    """An infinite iterable of training batches (lists of mapped dicts) that can start at any
    iteration (:meth:`start_at`) and gives the same batches there as a run that got there
    without stopping.

    Args:
        records: the training records (Detectron2 dataset dicts or query-gallery pairs).
        mapper: record -> model input dict, or None to skip the record.
        total_batch_size: records per iteration over all processes (``SOLVER.IMS_PER_BATCH``).
        seed: the stream's seed (store it with the checkpoint when it was drawn at random).
        num_workers: data-loading worker processes (``DATALOADER.NUM_WORKERS``).
        group_by_aspect: batch landscape and portrait images separately
            (``DATALOADER.ASPECT_RATIO_GROUPING``).
        rank, world_size: this process's share of each batch.
    """

    def __init__(self, records: Sequence[Dict], mapper: Callable[[Dict], Optional[Dict]],
                 total_batch_size: int, seed: int, num_workers: int = 0,
                 group_by_aspect: bool = True, rank: int = 0, world_size: int = 1):
        self.sampler = ResumableBatchSampler(
            _aspect_groups(records, group_by_aspect), total_batch_size, seed, rank, world_size
        )
        self.dataset = _MappedBatches(records, mapper, self.sampler)
        self.num_workers = int(num_workers)

    @property
    def seed(self) -> int:
        return self.sampler.seed

    def set_seed(self, seed: int) -> None:
        """Use ``seed`` (e.g. the one of the run being resumed) from the next ``iter()`` on."""
        self.sampler.seed = int(seed)
        self.sampler._cached_epoch = None

    def start_at(self, iteration: int) -> None:
        """The next ``iter()`` starts with batch ``iteration``."""
        self.dataset.start = int(iteration)

    def __iter__(self) -> Iterator[List[Dict]]:
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_batch_as_is,
            # a private generator: creating the iterator must not draw from the global torch RNG
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)
