"""Shared by tests/test_oim.py: the per-rank batches and the gloo worker of the two-process test.

The worker lives in its own module (not in the test file) so that ``torch.multiprocessing``
spawn can import it by name in the child processes.
"""
import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F

from qeeps_d2.modeling.oim import OIMLoss

NUM_PIDS = 5
QUEUE_SIZE = 3
EMB_DIM = 4
WORLD_SIZE = 2
# Rows per (step, rank). Step 1 leaves rank 1 empty; step 3 leaves both ranks empty.
ROWS_PER_STEP = [(4, 3), (5, 0), (2, 6), (0, 0), (3, 3)]


def make_oim_loss() -> OIMLoss:
    """The module every rank and the single-process reference start from."""
    return OIMLoss(num_pids=NUM_PIDS, queue_size=QUEUE_SIZE, emb_dim=EMB_DIM)


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic per-step (embeddings (N, D), pids (N,)) of ``rank``; ranks get different data.

    Pids repeat within and across ranks and about a third of the rows are unlabeled (-1).
    """
    generator = torch.Generator().manual_seed(1000 + rank)
    batches = []
    for counts in ROWS_PER_STEP:
        n = counts[rank]
        embeddings = F.normalize(torch.randn(n, EMB_DIM, generator=generator), dim=1)
        pids = torch.randint(-1, NUM_PIDS, (n,), generator=generator)
        pids[torch.rand(n, generator=generator) < 0.2] = -1
        batches.append((embeddings, pids))
    return batches


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    """Train ``make_oim_loss()`` on this rank's batches in a gloo group of WORLD_SIZE processes.

    Saves ``{out_dir}/rank{rank}.pt`` with the final lut/queue/queue_ptr and the per-step losses.
    """
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        torch.manual_seed(0)
        oim = make_oim_loss().train()
        losses = []
        for embeddings, pids in rank_batches(rank):
            embeddings = embeddings.clone().requires_grad_()
            loss = oim(embeddings, pids)
            loss.backward()
            losses.append(loss.detach())
        result = {name: buf.clone() for name, buf in oim.named_buffers()}
        result["losses"] = torch.stack(losses)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
