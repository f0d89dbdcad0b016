"""Online Instance Matching (OIM) loss with a lookup table and a circular queue.

The loss scores each foreground proposal embedding against a lookup table (LUT) of labeled
identities and a circular queue (CQ) of recent unlabeled embeddings (SeqNet's variant, see
``datasets-and-protocols.md`` section 5):

    logits = scalar * [x @ lut^T || x @ queue^T]       (N, num_pids + queue_size)
    loss   = mean over labeled rows of cross_entropy(logits, pid)

After the loss is computed (training mode only) the tables are updated without gradient:

    lut[y] <- normalize(m * lut[y] + (1 - m) * x)       for every labeled row, in order
    queue[ptr] <- x; ptr <- (ptr + 1) % queue_size      for every unlabeled row, in order

Under multi-process training (``torch.distributed`` initialised with world size > 1) the
(embedding, pid) rows of every rank are all-gathered before the update, which is applied in rank
order on every rank, so the buffers stay bit-identical across ranks even though DDP does not
broadcast buffers (``create_ddp_model(..., broadcast_buffers=False)``).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OIMLoss"]

UNLABELED_PID = -1


def _distributed_world_size() -> int:
    """Number of processes in the default group, 1 when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _all_gather_rows(embeddings: Tensor, pids: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate the (embeddings, pids) rows of every rank, in rank order.

    Ranks may hold different numbers of rows (including zero): the row counts are all-gathered
    first, then every rank pads its rows to the largest count so that plain ``all_gather``
    (supported by gloo and nccl) applies. Every rank must call this collectively.

    Args:
        embeddings: (N_r, D) detached embeddings of this rank.
        pids: (N_r,) int64 pids of this rank.
    Returns:
        (sum_r N_r, D) embeddings and (sum_r N_r,) pids of all ranks, rank 0 first.
    """
    world_size = dist.get_world_size()
    count = torch.tensor([embeddings.shape[0]], dtype=torch.int64, device=embeddings.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    max_count = max(counts)
    if max_count == 0:
        return embeddings, pids

    padded_emb = embeddings.new_zeros((max_count, embeddings.shape[1]))
    padded_emb[: embeddings.shape[0]] = embeddings
    padded_pids = pids.new_full((max_count,), UNLABELED_PID)
    padded_pids[: pids.shape[0]] = pids
    gathered_emb = [torch.empty_like(padded_emb) for _ in range(world_size)]
    gathered_pids = [torch.empty_like(padded_pids) for _ in range(world_size)]
    dist.all_gather(gathered_emb, padded_emb)
    dist.all_gather(gathered_pids, padded_pids)
    all_emb = torch.cat([e[:n] for e, n in zip(gathered_emb, counts)])
    all_pids = torch.cat([p[:n] for p, n in zip(gathered_pids, counts)])
    return all_emb, all_pids


def _occurrence_rank(pids: Tensor) -> Tensor:
    """For each row, how many earlier rows carry the same pid: (N,) int64.

    E.g. pids [4, 7, 4, 4, 7] -> [0, 0, 1, 2, 1]. Rows of equal rank have distinct pids, so the
    sequential per-row LUT update can be applied one rank ("round") at a time.
    """
    order = torch.sort(pids, stable=True).indices
    sorted_pids = pids[order]
    position = torch.arange(pids.numel(), device=pids.device)
    is_group_start = torch.ones_like(sorted_pids, dtype=torch.bool)
    is_group_start[1:] = sorted_pids[1:] != sorted_pids[:-1]
    group_start = torch.cummax(torch.where(is_group_start, position, 0), dim=0).values
    rank = torch.empty_like(position)
    rank[order] = position - group_start
    return rank


class OIMLoss(nn.Module):
    """OIM loss over a labeled-identity lookup table and a circular queue of unlabeled features.

    Buffers (persistent: saved in checkpoints and restored on resume):
        lut:       (num_pids, emb_dim) float32, row ``p`` is the L2-normalised running mean of
                   identity ``p``'s embeddings (zeros until ``p`` is seen).
        queue:     (queue_size, emb_dim) float32, the most recent unlabeled embeddings.
        queue_ptr: () int64, next write position in ``queue``.
    """

    def __init__(
        self,
        num_pids: int,
        queue_size: int,
        emb_dim: int = 256,
        scalar: float = 30.0,
        momentum: float = 0.5,
    ):
        """
        Args:
            num_pids: number of labeled training identities (LUT rows); pids are 0..num_pids-1.
            queue_size: number of unlabeled embeddings kept in the circular queue.
            emb_dim: embedding dimension D.
            scalar: inverse temperature applied to the cosine similarities.
            momentum: weight ``m`` of the old LUT row in the update.
        """
        super().__init__()
        for name, value in (("num_pids", num_pids), ("queue_size", queue_size), ("emb_dim", emb_dim)):
            if value <= 0:
                raise ValueError(f"OIMLoss: {name} must be positive, got {value}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"OIMLoss: momentum must lie in [0, 1), got {momentum}")
        self.num_pids = num_pids
        self.queue_size = queue_size
        self.emb_dim = emb_dim
        self.scalar = scalar
        self.momentum = momentum
        self.register_buffer("lut", torch.zeros(num_pids, emb_dim))
        self.register_buffer("queue", torch.zeros(queue_size, emb_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return (
            f"num_pids={self.num_pids}, queue_size={self.queue_size}, emb_dim={self.emb_dim}, "
            f"scalar={self.scalar}, momentum={self.momentum}"
        )

    def forward(self, embeddings: Tensor, pids: Tensor) -> Tensor:
        """
        Args:
            embeddings: (N, D) L2-normalised embeddings of foreground proposals (N may be 0).
            pids: (N,) int64, identity in [0, num_pids) for labeled rows, -1 for unlabeled rows.
        Returns:
            Scalar loss: cross-entropy averaged over the labeled rows, or ``embeddings.sum() * 0``
            (still attached to the graph) when there is none.

        In training mode the LUT and queue are then updated with the rows of every rank (see the
        module docstring); the gradient always uses the tables as they were before this update.
        Under torch.distributed, every rank must call this at every training step, even with N = 0,
        because the update all-gathers across ranks.
        """
        self._check_inputs(embeddings, pids)
        labeled = pids >= 0
        if bool(labeled.any()):
            # torch.cat makes a fresh tensor, so the in-place updates below cannot alter the
            # table saved for backward: gradients use the pre-update LUT and queue.
            table = torch.cat([self.lut, self.queue])
            logits = self.scalar * embeddings[labeled].to(table.dtype) @ table.t()
            loss = F.cross_entropy(logits, pids[labeled])
        else:
            loss = embeddings.sum() * 0.0

        if self.training:
            rows, row_pids = embeddings.detach(), pids
            if _distributed_world_size() > 1:
                rows, row_pids = _all_gather_rows(rows, row_pids)
            self._update(rows.to(self.lut.dtype), row_pids)
        return loss

    def _check_inputs(self, embeddings: Tensor, pids: Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.emb_dim:
            raise ValueError(
                f"OIMLoss: embeddings must have shape (N, {self.emb_dim}), "
                f"got {tuple(embeddings.shape)}"
            )
        if pids.shape != (embeddings.shape[0],):
            raise ValueError(
                f"OIMLoss: pids must have shape ({embeddings.shape[0]},) to match the embeddings, "
                f"got {tuple(pids.shape)}"
            )
        if pids.dtype != torch.int64 or pids.device != embeddings.device:
            raise ValueError(
                f"OIMLoss: pids must be int64 on the embeddings' device ({embeddings.device}), "
                f"got {pids.dtype} on {pids.device}"
            )
        invalid = (pids < UNLABELED_PID) | (pids >= self.num_pids)
        if bool(invalid.any()):
            raise ValueError(
                f"OIMLoss: pid {int(pids[invalid][0])} is out of range: expected -1 (unlabeled) "
                f"or 0..{self.num_pids - 1} (num_pids={self.num_pids})"
            )

    @torch.no_grad()
    def _update(self, embeddings: Tensor, pids: Tensor) -> None:
        """Apply the LUT and queue updates for (N, D) embeddings and (N,) pids, in row order."""
        labeled = pids >= 0
        lab_emb, lab_pids = embeddings[labeled], pids[labeled]
        if lab_pids.numel() > 0:
            occurrence = _occurrence_rank(lab_pids)
            for r in range(int(occurrence.max()) + 1):
                in_round = occurrence == r
                y = lab_pids[in_round]
                mixed = self.momentum * self.lut[y] + (1.0 - self.momentum) * lab_emb[in_round]
                self.lut[y] = F.normalize(mixed, dim=1)

        unlabeled = embeddings[~labeled]
        num_unlabeled = unlabeled.shape[0]
        if num_unlabeled > 0:
            # Only the last queue_size rows survive a sequential write; skipping the others keeps
            # the write indices distinct.
            kept = unlabeled[-self.queue_size :]
            start = self.queue_ptr + (num_unlabeled - kept.shape[0])
            slots = (start + torch.arange(kept.shape[0], device=kept.device)) % self.queue_size
            self.queue[slots] = kept
            self.queue_ptr.copy_((self.queue_ptr + num_unlabeled) % self.queue_size)
