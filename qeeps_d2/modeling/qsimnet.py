"""QSimNet (paper Sec. 4.3): a learned query-gallery similarity on re-id embeddings."""
import torch
from torch import nn

__all__ = ["QSimNet"]


class QSimNet(nn.Module):
    """``(f_q - f_g)^2 -> BatchNorm -> FC -> 2 logits`` (softmax column 1 = "same person").

    Args:
        embed_dim: D, the dimension of the re-id embeddings.
        init: "default" (PyTorch's initialisation, the paper's "new layers use default init")
            or "distance": the FC starts as the (normalised) squared embedding distance, logit
            "same" - logit "different" = -2 / sqrt(D) * sum_k BN(d)_k, so that a QSimNet added
            to a trained OIM model starts by ranking like the model's cosine similarity (for unit
            embeddings ||f_q - f_g||^2 = 2 - 2 cos) and learns a weighting from there.
    """

    def __init__(self, embed_dim: int, init: str = "default"):
        super().__init__()
        self.norm = nn.BatchNorm1d(embed_dim)
        self.cls = nn.Linear(embed_dim, 2)
        if init == "distance":
            with torch.no_grad():
                w = 1.0 / embed_dim ** 0.5
                self.cls.weight[0].fill_(w)
                self.cls.weight[1].fill_(-w)
                self.cls.bias.zero_()
        elif init != "default":
            raise ValueError(f'QSimNet init must be "default" or "distance", got {init!r}')

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
