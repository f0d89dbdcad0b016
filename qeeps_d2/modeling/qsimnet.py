"""QSimNet (paper Sec. 4.3): a learned query-gallery similarity on re-id embeddings."""
import torch
from torch import nn

__all__ = ["QSimNet"]


class QSimNet(nn.Module):
    """``(f_q - f_g)^2 -> BatchNorm -> FC -> 2 logits`` (softmax column 1 = "same person").

    Args:
        embed_dim: D, the dimension of the re-id embeddings.
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(embed_dim)
        self.cls = nn.Linear(embed_dim, 2)

    def forward(self, query_embeds: torch.Tensor, gallery_embeds: torch.Tensor) -> torch.Tensor:
        """
        Args:
            query_embeds: (R, D) the query embedding of each row's pair (broadcastable (1, D)).
            gallery_embeds: (R, D) gallery proposal embeddings.
        Returns:
            (R, 2) logits.
        """
        return self.cls(self.norm((query_embeds - gallery_embeds) ** 2))

    def similarity(self, query_embeds: torch.Tensor, gallery_embeds: torch.Tensor) -> torch.Tensor:
        """(R,) probability that each gallery row shows the query person."""
        return self(query_embeds, gallery_embeds).softmax(dim=1)[:, 1]
