"""A local, query-guided similarity for QSimNet rows: query cells matched to gallery cells.

The paper's QSimNet (qsimnet.py) compares the query's and a gallery box's global re-id
embeddings. This head compares them cell by cell: each box's identity-path feature map before
res5 (MODEL.QEEPS.ID_POOLER with OWN_STAGES; on SynthPS the res4 map, 6 x 3 cells of 128
channels) is standardised, projected to ``dim`` and L2-normalised per cell; every query cell
attends over the gallery box's cells (softmax of the cosines at a learned temperature tau) and
takes the attention-weighted cosine, so that a logo, a hat or a garment pattern of the query is
looked for wherever it sits in the gallery box (pose, crop and occlusion move it); the mean
over the query cells is added to a learned share ``alpha`` of the global embeddings' cosine::

    s_ij = <c_i(q), c_j(g)>,   a_ij = softmax_j(s_ij / tau)
    sim(q, g) = (mean_i sum_j a_ij s_ij + alpha cos(e_q, e_g)) / (1 + |alpha|)   in [-1, 1]

It is a pairwise score (the alignment depends on both boxes), so it needs the query at search
time like QSimNet; it is fitted after training (qeeps_d2/engine/local_similarity_fit.py), on
labeled training boxes (and the identity-pretraining set's, when present) with a softmax loss
over one positive and hard and random negatives.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LocalSimilarity", "local_similarity", "agnostic_similarity"]


def local_similarity(query_cells: torch.Tensor, gallery_cells: torch.Tensor,
                     query_embeds: torch.Tensor, gallery_embeds: torch.Tensor,
                     tau, alpha) -> torch.Tensor:
    """The local head's score (module docstring) at temperature ``tau`` and share ``alpha``.

    Args:
        query_cells: (R, P, d) or (1, P, d) unit cell descriptors; gallery_cells: (R, P, d).
        query_embeds: (R, D) or (1, D) unit global embeddings; gallery_embeds: (R, D).
        tau, alpha: scalars (floats or 0-d tensors).
    Returns:
        (R,) similarities in [-1, 1].
    """
    s = torch.einsum("rid,rjd->rij", query_cells.expand_as(gallery_cells), gallery_cells)
    attention = (s / tau).softmax(dim=2)
    local = (attention * s).sum(dim=2).mean(dim=1)
    glob = (query_embeds * gallery_embeds).sum(dim=1)
    return (local + alpha * glob) / (1.0 + abs(alpha))


def agnostic_similarity(query: Mapping, embeds: torch.Tensor,
                        cells: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Similarity of N query-agnostic detections to a query-agnostic query output.

    Args:
        query: the model's output for a query box: ``query_embed`` (D,) and, with a fitted
            local head, ``query_cells`` (P, d) and ``local_params`` (2,) = (tau, alpha).
        embeds: (N, D) the detections' ``pred_embeds``.
        cells: (N, P, d) their ``pred_cells`` (a fitted local head), or None.
    Returns:
        (N,) the local head's score when both sides have cells (the first stage of a cascade
        then ranks as its pair stage does, on features computed without query guidance),
        else the cosine ``embeds @ query_embed``.
    """
    if cells is None or query.get("query_cells") is None or not len(embeds):
        return embeds @ query["query_embed"]
    tau, alpha = query["local_params"].tolist()
    return local_similarity(query["query_cells"][None], cells, query["query_embed"][None],
                            embeds, tau, alpha)


class LocalSimilarity(nn.Module):
    """
    Args:
        in_channels: C, channels of the feature map each box is described by.
        dim: d, the projected cell dimension.
    """

    def __init__(self, in_channels: int, dim: int = 64):
        super().__init__()
        # cell standardisation, set when the head is fitted (qeeps_d2.engine.local_similarity_fit)
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("std", torch.ones(in_channels))
        # 1 once fitted: an unfitted head is not used (QSimNet scores instead)
        self.register_buffer("fitted_flag", torch.zeros((), dtype=torch.uint8))
        self.proj = nn.Linear(in_channels, dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.1)))
        self.alpha = nn.Parameter(torch.tensor(1.0))

    @property
    def fitted(self) -> bool:
        return bool(self.fitted_flag)

    def cells(self, maps: torch.Tensor) -> torch.Tensor:
        """(R, C, h, w) feature maps -> (R, h*w, d) unit cell descriptors."""
        return self.cells_from_flat(maps.flatten(2).transpose(1, 2))

    def cells_from_flat(self, x: torch.Tensor) -> torch.Tensor:
        """(R, P, C) cells -> (R, P, d) unit cell descriptors."""
        return F.normalize(self.proj((x - self.mean) / self.std), dim=-1)

    def forward(self, query_cells: torch.Tensor, gallery_cells: torch.Tensor,
                query_embeds: torch.Tensor, gallery_embeds: torch.Tensor) -> torch.Tensor:
        """
        Args:
            query_cells: (R, P, d) or (1, P, d) from :meth:`cells`.
            gallery_cells: (R, P, d).
            query_embeds: (R, D) or (1, D) unit global embeddings; gallery_embeds: (R, D).
        Returns:
            (R,) similarities in [-1, 1].
        """
        return local_similarity(query_cells, gallery_cells, query_embeds, gallery_embeds,
                                self.log_tau.exp(), self.alpha)

    def params(self) -> torch.Tensor:
        """(2,) = (tau, alpha), what :func:`agnostic_similarity` needs besides the cells."""
        return torch.stack([self.log_tau.exp(), self.alpha]).detach()
