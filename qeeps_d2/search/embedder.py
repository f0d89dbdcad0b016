"""The query-agnostic path (detector + re-id embedding) behind one interface, whatever runs it.

``qeeps-index`` embeds every frame of an archive once; the PyTorch model
(:class:`TorchFrameEmbedder`) and its ONNX export (``qeeps_d2.search.onnx_backend``) both serve
it through :class:`FrameEmbedder`, so the index builder, the parity tests and the benchmarks do
not care which one runs. This module imports numpy only; :class:`TorchFrameEmbedder` imports the
model code (torch, Detectron2) when it is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

try:  # Python >= 3.8
    from typing import Protocol
except ImportError:  # pragma: no cover
    Protocol = object

__all__ = ["FrameDetections", "FrameEmbedder", "TorchFrameEmbedder"]


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


class TorchFrameEmbedder:
    """:class:`FrameEmbedder` running a QEEPS model in PyTorch, query-agnostically (the OIM
    baseline; a query-guided model runs as the cascade's first stage: guidance off).

    It runs the model exactly as :class:`~qeeps_d2.search.PersonSearcher` does for a
    query-agnostic search (same mapper, same resizing, only frames of one size share a forward
    pass), so an index built with it ranks as ``qeeps-search`` does.

    Attributes:
        cfg: the model's frozen config; ``det_thresh`` = its ``TEST.PERSON_SEARCH.DET_THRESH``.
        searcher: the :class:`~qeeps_d2.search.PersonSearcher` around the model (for pair-mode
            re-scoring with a query-guided model).
        embed_dim: ``MODEL.QEEPS.EMBED_DIM``.
    """

    def __init__(self, cfg, model):
        """
        Args:
            cfg: the model's (frozen) config.
            model: a built ``QEEPS`` model with its weights loaded (put in eval mode).
        """
        from .searcher import PersonSearcher

        self.cfg = cfg
        self.searcher = PersonSearcher(cfg, model)
        self.det_thresh = self.searcher.det_thresh
        self.embed_dim = int(cfg.MODEL.QEEPS.EMBED_DIM)

    @classmethod
    def from_config(cls, config_file: str, weights: str, device: Optional[str] = None,
                    opts: Sequence[str] = ()) -> "TorchFrameEmbedder":
        """Build and load the model as :meth:`PersonSearcher.from_config` does (same arguments
        and errors)."""
        from .searcher import PersonSearcher

        searcher = PersonSearcher.from_config(config_file, weights, device=device, opts=opts)
        return cls(searcher.cfg, searcher.model)

    def signature(self) -> str:
        """A hash of what decides the embeddings: the config (without the device, the weights
        path, ``DET_THRESH`` and the OIM table size) and the model's weights (the tensors, so a
        copied or moved weights file keeps its signature)."""
        import hashlib

        import torch

        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR = "", "", ""
        cfg.TEST.PERSON_SEARCH.DET_THRESH = 0.0
        cfg.MODEL.QEEPS.OIM.NUM_PIDS = 0
        digest = hashlib.sha256(cfg.dump().encode())
        for name, value in self.searcher.model.state_dict().items():
            if isinstance(value, torch.Tensor):
                digest.update(name.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def embed_frames(self, images: Sequence[np.ndarray]) -> List[FrameDetections]:
        """Detections (score >= ``det_thresh``) and embeddings of each (H, W, 3) uint8 BGR image,
        in one call (batch as you like: a result does not depend on the other images)."""
        from .gallery import GalleryFrame

        frames = [GalleryFrame(f"image {i}", image, i) for i, image in enumerate(images)]
        found = []
        for instances in self.searcher.detect(frames) if frames else []:
            found.append(FrameDetections(
                boxes=instances.pred_boxes.tensor.cpu().numpy().astype(np.float32).reshape(-1, 4),
                scores=instances.scores.cpu().numpy().astype(np.float32).reshape(-1),
                embeddings=instances.pred_embeds.cpu().numpy().astype(np.float32).reshape(
                    -1, self.embed_dim),
            ))
        return found

    def embed_query(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """(D,) float32 embedding of the query person (:meth:`PersonSearcher.embed_query`)."""
        embed = self.searcher.embed_query(image, box)
        return embed.cpu().numpy().astype(np.float32).reshape(self.embed_dim)
