"""Person-search evaluation protocols as plain numpy data (no torch).

A protocol is the list of queries of a test set and, for every query, the ordered gallery it is
searched in, with the query person's ground-truth box in each gallery entry (or none). The data
loaders (CUHK-SYSU, PRW, PRW-mini, SynthPS) build protocols; the scoring code in
``qeeps_d2.evaluation`` consumes them. Everything here is numpy-only so that protocol scoring can
be imported and tested without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

__all__ = ["Query", "Gallery", "SearchProtocol"]


@dataclass(frozen=True)
class Query:
    """One query of a protocol.

    Attributes:
        index: position in the protocol's query list (TestG file order / query_info line order).
        image: base name of the query's scene image, with extension (``"s15538.jpg"``).
        box: (4,) float64 XYXY absolute pixels of the query person in ``image``.
        person_id: the query identity in the test set's own id space (>= 0).
        camera_id: camera of the query frame (PRW), -1 when the data set has none.
    """

    index: int
    image: str
    box: np.ndarray
    person_id: int
    camera_id: int = -1


@dataclass(frozen=True)
class Gallery:
    """The gallery of one query, in the reference order (duplicates are kept on purpose).

    Attributes:
        images: G base names of gallery images. An image may appear more than once (CUHK-SYSU
            TestG quirks); each entry is scored on its own, as the reference code does.
        gt_boxes: (G, 4) float64 XYXY of the query person in each entry; rows of NaN where the
            image does not contain the query person.
    """

    images: List[str]
    gt_boxes: np.ndarray

    def __post_init__(self):
        if self.gt_boxes.shape != (len(self.images), 4):
            raise ValueError(
                f"gt_boxes must have shape ({len(self.images)}, 4), got {self.gt_boxes.shape}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def positive(self) -> np.ndarray:
        """(G,) bool: entries whose image contains the query person."""
        return ~np.isnan(self.gt_boxes[:, 0])

    @property
    def count_gt(self) -> int:
        """Number of gallery entries holding the target (the reference ``count_gt``)."""
        return int(self.positive.sum())


@dataclass
class SearchProtocol:
    """Queries of a test set and a way to get each query's gallery.

    Galleries can be large (PRW: 6,111 frames per query, 2,057 queries), so they are produced on
    demand by ``gallery_fn(query_index) -> Gallery`` rather than stored.

    Attributes:
        name: e.g. ``"cuhk_sysu_test/G100"``, ``"prw_test"``, ``"prw_test/cross_camera"``.
        dataset: the registered data set name the protocol belongs to (``"cuhk_sysu_test"``).
        queries: the queries, ``queries[i].index == i``.
        gallery_fn: callable giving the :class:`Gallery` of query ``i``.
        image_root: folder holding the images (for rendering and inference), may be empty.
    """

    name: str
    dataset: str
    queries: List[Query]
    gallery_fn: Callable[[int], Gallery] = field(repr=False)
    image_root: str = ""

    def __len__(self) -> int:
        return len(self.queries)

    def gallery(self, index: int) -> Gallery:
        return self.gallery_fn(index)

    def gallery_images(self, indices: Optional[Sequence[int]] = None) -> List[str]:
        """Distinct gallery image names over the given queries (all by default), sorted."""
        indices = range(len(self.queries)) if indices is None else indices
        names = set()
        for i in indices:
            names.update(self.gallery(i).images)
        return sorted(names)
