"""The query-agnostic path (detector + re-id embedding) behind one interface, whatever runs it.

``qeeps-index`` embeds every frame of an archive once; the PyTorch model and its ONNX export
(``qeeps_d2.search.onnx_backend``) both serve it through :class:`FrameEmbedder`, so the index
builder, the parity tests and the benchmarks do not care which one runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

try:  # Python >= 3.8
    from typing import Protocol
except ImportError:  # pragma: no cover
    Protocol = object

__all__ = ["FrameDetections", "FrameEmbedder"]


@dataclass(frozen=True)
class FrameDetections:
    """The people found in one frame.

    Attributes:
        boxes: (N, 4) float32 XYXY in the frame's own pixels (before any model resizing).
        scores: (N,) float32 detection scores, each >= the model's ``DET_THRESH``.
        embeddings: (N, D) float32 re-id embeddings, L2-normalised (a row's norm is 1), so an
            inner product with a normalised query embedding is the cosine similarity.
    """

    boxes: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


class FrameEmbedder(Protocol):
    """What runs the query-agnostic path: the PyTorch model or an exported one.

    Attributes:
        embed_dim: D, the embedding size.
    """

    embed_dim: int

    def embed_frames(self, images: Sequence[np.ndarray]) -> List[FrameDetections]:
        """Detect and embed the people of each (H, W, 3) uint8 BGR image; one result per image,
        independent of the other images passed with it."""
        ...

    def embed_query(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """(D,) float32 L2-normalised embedding of the person in ``box`` (x1, y1, x2, y2, image
        pixels) of the (H, W, 3) uint8 BGR ``image``, as the model embeds a query."""
        ...
