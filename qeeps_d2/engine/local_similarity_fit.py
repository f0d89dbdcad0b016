"""Fitting the local similarity head (MODEL.QEEPS.QSIMNET.LOCAL) at the end of training.

The head (qeeps_d2/modeling/local_similarity.py) is fitted on fixed features: every labeled
training box (and, with PRETRAIN_IDS, every labeled box of the identity-pretraining set, whose
identities are disjoint from train and test) is described once by the trained network as at
test time (query-agnostic, eval mode): its identity-path map before res5 (P cells of C
channels) and its global embedding. Each iteration takes FIT_BATCH anchor boxes; each anchor's
candidates are one other box of its identity and HARD_NEGATIVES boxes drawn from the HARD_POOL
other-identity boxes nearest to it by global cosine plus RANDOM_NEGATIVES random other-identity
boxes; a softmax over the candidates' similarities (x10) is trained to pick the positive.

:class:`LocalSimilarityFit` runs it after the last iteration's step and before Detectron2's
checkpointer and evaluation hooks, so ``model_final.pth`` and the final evaluation have the
fitted head.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from detectron2.engine import HookBase
from detectron2.structures import Boxes

from qeeps_d2.engine.hooks import labeled_box_records

__all__ = ["describe_labeled_boxes", "fit_local_similarity", "LocalSimilarityFit"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def describe_labeled_boxes(model, records: Sequence[Dict], mapper, batch_size: int = 8
                           ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The labeled boxes of ``records`` as the trained network sees them at test time.

    Images of equal size after the mapper's resize run ``batch_size`` per forward (no padding,
    so each image's features are those of a forward of its own); others one by one.

    Returns:
        maps (N, P, C) identity-path cells before res5 (float32, CPU), embeds (N, D) unit global
        embeddings, pids (N,) int64 (in record order); None when no record has a labeled box.
    """
    was_training = model.training
    model.eval()
    heads = model.roi_heads
    maps, embeds, pids = [], [], []

    def run(group):
        images = model.preprocess_image([inp for inp, _ in group])
        features = model.backbone(images.tensor)
        boxes = [Boxes(inp["given_boxes"].to(images.tensor.device)) for inp, _ in group]
        pooled, m = heads.box_features(features, boxes, return_map=True)
        embeds.append(heads.embed(pooled).float().cpu())
        maps.append(m.flatten(2).transpose(1, 2).float().cpu())
        for _, ids in group:
            pids.extend(ids)

    try:
        group = []
        for record, ids in labeled_box_records(records):
            inp = mapper(record)
            if group and (inp["image"].shape != group[0][0]["image"].shape
                          or len(group) == batch_size):
                run(group)
                group = []
            group.append((inp, ids))
        if group:
            run(group)
    finally:
        model.train(was_training)
    if not pids:
        return None
    return torch.cat(maps), torch.cat(embeds), torch.as_tensor(pids, dtype=torch.int64)


def fit_local_similarity(head, maps: torch.Tensor, embeds: torch.Tensor, pids: torch.Tensor,
                         iters: int = 250, batch: int = 256, hard_negatives: int = 8,
                         random_negatives: int = 8, hard_pool: int = 20, lr: float = 3e-3,
                         seed: int = 0) -> float:
    """Fit ``head`` (a :class:`~qeeps_d2.modeling.local_similarity.LocalSimilarity`) on boxes
    described by :func:`describe_labeled_boxes`; sets its standardisation and marks it fitted.

    Args:
        maps: (N, P, C) cells; embeds: (N, D) unit embeddings; pids: (N,) identities (>= 0).
        iters, batch, hard_negatives, random_negatives, hard_pool, lr: see
            MODEL.QEEPS.QSIMNET.LOCAL in qeeps_d2/config.py.
    Returns:
        the loss of the last iteration.
    Raises:
        ValueError: fewer than two identities with two boxes each (nothing to learn from).
    """
    counts = torch.bincount(pids - pids.min())
    if int((counts >= 2).sum()) < 2:
        raise ValueError("the local similarity head needs at least two identities with two or "
                         "more labeled boxes each")
    device = head.proj.weight.device
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        flat = maps.reshape(-1, maps.shape[-1])
        head.mean.copy_(flat.mean(dim=0).to(device))
        head.std.copy_((flat.std(dim=0) + 1e-3).to(device))
    # anchors: boxes whose identity has another box; pools of other-identity boxes by cosine
    same = pids[:, None] == pids[None]
    anchors = torch.nonzero(same.sum(dim=1) >= 2).squeeze(1)
    sims = (embeds @ embeds.T).masked_fill(same, -3.0)
    hard = sims.topk(min(hard_pool, len(pids) - 1), dim=1).indices
    boxes_of = {p: torch.nonzero(pids == p).squeeze(1) for p in pids.unique().tolist()}
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    was_training = head.training
    head.train()
    loss = torch.zeros(())
    for _ in range(iters):
        a = anchors[torch.randint(len(anchors), (batch,), generator=g)]
        pos = []
        for i in a.tolist():
            same_id = boxes_of[int(pids[i])]
            mates = same_id[same_id != i]
            pos.append(int(mates[torch.randint(len(mates), (1,), generator=g)]))
        pos = torch.as_tensor(pos)
        negs = [hard[a][torch.arange(batch)[:, None],
                        torch.randint(hard.shape[1], (batch, hard_negatives), generator=g)],
                torch.randint(len(pids), (batch, random_negatives), generator=g)]
        cand = torch.cat([pos[:, None]] + negs, dim=1)  # (batch, K): the positive first
        k = cand.shape[1]
        valid = pids[cand] != pids[a][:, None]
        valid[:, 0] = True
        q_cells = head.cells_from_flat(maps[a].to(device))  # (batch, P, d)
        g_cells = head.cells_from_flat(maps[cand.reshape(-1)].to(device))
        scores = head(q_cells.repeat_interleave(k, dim=0), g_cells,
                      embeds[a].to(device).repeat_interleave(k, dim=0),
                      embeds[cand.reshape(-1)].to(device)).reshape(batch, k)
        # the head's output is divided by 1 + |alpha|; undo it so alpha changes the ranking only
        logits = 10.0 * scores * (1.0 + head.alpha.abs())
        logits = logits.masked_fill(~valid.to(device), -1e4)
        loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.train(was_training)
    head.fitted_flag.fill_(1)
    return float(loss)


def _pretrain_records(cfg) -> List[Dict]:
    """The identity-pretraining set's training records when that set is on disk, else []."""
    from qeeps_d2.data.datasets.cuhk_sysu import load_cuhk_sysu
    from qeeps_d2.data.synthps.generator import is_complete
    from qeeps_d2.engine.pretrain import pretrain_root

    root = pretrain_root(cfg.PRETRAIN)
    if not (os.path.isdir(root) and is_complete(root)):
        return []
    return load_cuhk_sysu(root, "train")


class LocalSimilarityFit(HookBase):
    """Fit the model's local similarity head after the last iteration (see module docstring).

    Args:
        cfg: the training config (MODEL.QEEPS.QSIMNET.LOCAL, PRETRAIN).
        records: the training scene images (Detectron2 dataset dicts with ``person_id``).
        mapper: a test-time :class:`~qeeps_d2.data.mapper.PersonSearchMapper`.
    """

    def __init__(self, cfg, records, mapper):
        self._cfg = cfg
        self._records = records
        self._mapper = mapper

    def after_step(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:
            return
        from detectron2.utils import comm

        model = self.trainer.model
        model = getattr(model, "module", model)
        head = model.roi_heads.local_sim
        if comm.is_main_process():
            self.fit(model, head)
        if comm.get_world_size() > 1:  # same head on every rank
            for t in list(head.parameters()) + list(head.buffers()):
                torch.distributed.broadcast(t.data, 0)

    def fit(self, model, head) -> None:
        c = self._cfg.MODEL.QEEPS.QSIMNET.LOCAL
        start = time.perf_counter()
        described = [describe_labeled_boxes(model, self._records, self._mapper)]
        if c.PRETRAIN_IDS:
            extra = _pretrain_records(self._cfg)
            if extra:
                described.append(describe_labeled_boxes(model, extra, self._mapper))
        described = [d for d in described if d is not None]
        if not described:
            logger.warning("Local similarity head NOT fitted: no labeled training box; QSimNet "
                           "scores the pairs")
            return
        maps, embeds, pids, offset = [], [], [], 0
        for m, e, p in described:  # the sets' identities kept apart
            maps.append(m)
            embeds.append(e)
            pids.append(p + offset)
            offset = int(pids[-1].max()) + 1
        maps, embeds, pids = torch.cat(maps), torch.cat(embeds), torch.cat(pids)
        try:
            loss = fit_local_similarity(
                head, maps, embeds, pids, iters=c.FIT_ITERS, batch=c.FIT_BATCH,
                hard_negatives=c.HARD_NEGATIVES, random_negatives=c.RANDOM_NEGATIVES,
                hard_pool=c.HARD_POOL, lr=c.LR, seed=max(int(self._cfg.SEED), 0))
        except ValueError as e:  # too few identities: training still ends with QSimNet
            logger.warning("Local similarity head NOT fitted (%s); QSimNet scores the pairs", e)
            return
        logger.info("Local similarity head fitted on %d boxes of %d identities (%s) in %.0f s: "
                    "loss %.3f, alpha %.2f, tau %.3f", len(pids), len(np.unique(pids.numpy())),
                    "training + pretraining sets" if len(described) > 1 else "training set",
                    time.perf_counter() - start, loss, head.alpha.item(), head.log_tau.exp().item())
