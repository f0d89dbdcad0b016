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

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LocalSimilarity"]


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
        s = torch.einsum("rid,rjd->rij", query_cells.expand_as(gallery_cells), gallery_cells)
        attention = (s / self.log_tau.exp()).softmax(dim=2)
        local = (attention * s).sum(dim=2).mean(dim=1)
        glob = (query_embeds * gallery_embeds).sum(dim=1)
        return (local + self.alpha * glob) / (1.0 + self.alpha.abs())
