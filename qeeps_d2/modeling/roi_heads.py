"""The QEEPS ROI head: Detectron2's Res5 (C4) head plus the OIM re-id branch and QSimNet.

Per proposal, res5 on the ROI-pooled res4 features, averaged to a (R, C5) vector, feeds
- ClsNet + RegNet: the stock ``FastRCNNOutputLayers`` (``box_predictor``);
- the ID net: ``reid_head`` (FC to D, L2-normalised) trained with the OIM loss on foreground
  proposals (labeled ids to the lookup table, unlabeled people to the queue);
- QSimNet (when enabled and a query is given): similarity of each proposal to the query person,
  trained with a cross-entropy whose positives are the proposals matched to the query person.

At inference without a query the stock score threshold and NMS give the detections; with one
(pair mode) the query similarity ranks the detections and drives their NMS
(:meth:`QEEPSROIHeads.query_similarity`: the fitted local head, QSimNet, or the cosine).

The query's own embedding comes from the same res5 + ``reid_head`` applied to the query box on
the query branch's features (:meth:`QEEPSROIHeads.embed_boxes`), normalised with the running
statistics also in training.

With a separate detection head, the identity path may pool its boxes from an earlier backbone
stage (MODEL.QEEPS.ID_POOLER, e.g. res2 at 24 x 12) and run the rest of the backbone on each
pooled box before res5: every person then reaches res3..res5 at one scale, as a resized crop
would (see the config key).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.structures import Boxes, Instances

from .local_similarity import LocalSimilarity
from .oim import OIMLoss
from .qsimnet import QSimNet

__all__ = ["ReIDHead", "QEEPSROIHeads"]


class ReIDHead(nn.Module):
    """The ID-Net embedding: (R, C) -> FC -> BatchNorm -> L2 norm -> (R, D).

    The BatchNorm (as in SeqNet's embedding head; OIM-caffe has only the FC) centres the
    projected features: pooled res5 features are non-negative and strongly correlated, and
    without centring a freshly initialised head maps every box to nearly the same unit vector,
    where the OIM loss sits at log(table + queue size) with vanishing gradients.

    Its statistics must be those of PEOPLE: a training batch of proposals is mostly background,
    and with background in the statistics every person box is shifted the same way from the
    mean, so all person embeddings point in one direction (seen on SynthPS: test-time
    similarities of 0.999 for every box). In training, ``stats_mask`` selects the rows
    (foreground proposals) whose batch statistics normalise all rows and update the running
    ones; inference uses the running statistics.
    """

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, embed_dim)
        self.norm = nn.BatchNorm1d(embed_dim)
        nn.init.normal_(self.proj.weight, std=0.01)
        nn.init.constant_(self.proj.bias, 0)

    def forward(self, x: torch.Tensor, stats_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (R, C); stats_mask: (R,) bool rows giving the batch statistics (None = all)."""
        z = self.proj(x)
        norm = self.norm
        ref = z if stats_mask is None else z[stats_mask]
        if self.training and ref.shape[0] >= 2:
            mean, var = ref.mean(dim=0), ref.var(dim=0, unbiased=False)
            with torch.no_grad():
                m = norm.momentum
                norm.running_mean.mul_(1 - m).add_(m * mean.detach())
                norm.running_var.mul_(1 - m).add_(m * ref.var(dim=0, unbiased=True).detach())
                norm.num_batches_tracked.add_(1)
        else:  # inference, or too few rows for batch statistics: the running ones
            mean, var = norm.running_mean, norm.running_var
        z = (z - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
        return F.normalize(z, dim=1)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _cat_field(instances: List[Instances], name: str, fill: int) -> torch.Tensor:
    """Concatenate an integer/bool field over images; images without it contribute ``fill``."""
    parts = []
    for x in instances:
        if x.has(name):
            parts.append(x.get(name).long())
        else:
            parts.append(torch.full((len(x),), fill, dtype=torch.long, device=x.gt_classes.device))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@ROI_HEADS_REGISTRY.register()
class QEEPSROIHeads(Res5ROIHeads):
    """``Res5ROIHeads`` with the OIM ID branch and the optional QSimNet.

    Training inputs need ``gt_pids`` (>= 0 labeled, -1 unlabeled) on the targets and, for
    QSimNet, ``gt_is_query`` (bool) marking the query person in each gallery image.
    """

    @configurable
    def __init__(
        self,
        *,
        reid_head: nn.Module,
        oim_loss: nn.Module,
        qsimnet: Optional[nn.Module] = None,
        local_sim: Optional[nn.Module] = None,
        min_det_score: float = 0.01,
        trunk_grad_scale: float = 1.0,
        sim_on_people: bool = False,
        separate_det_head: bool = False,
        id_pooler: Optional[ROIPooler] = None,
        id_in_feature: str = "",
        id_own_stages: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if id_pooler is not None and not separate_det_head:
            raise ValueError("MODEL.QEEPS.ID_POOLER.IN_FEATURE needs MODEL.QEEPS.DET_HEAD "
                             "'separate': the shared head embeds the detector's own features")
        # identity boxes pooled from an earlier stage (MODEL.QEEPS.ID_POOLER); the backbone that
        # continues them is attached by the meta architecture (:meth:`attach_trunk`)
        self.id_pooler = id_pooler
        self.id_in_feature = id_in_feature
        self.id_own_stages = id_own_stages
        self._trunk: List[nn.Module] = []  # a plain list: not a submodule, no duplicate weights
        # with MODEL.QEEPS.ID_POOLER.OWN_STAGES: the identity path's copies of those stages
        self.id_trunk: Optional[nn.ModuleDict] = None
        # ClsNet/RegNet on their own res5 copy (see MODEL.QEEPS.DET_HEAD); ``res5`` keeps the
        # stock name and serves the identity path
        self.det_res5 = copy.deepcopy(self.res5) if separate_det_head else None
        if separate_det_head:
            self._register_load_state_dict_pre_hook(_det_res5_from_res5)
        self.reid_head = reid_head
        self.oim_loss = oim_loss
        self.qsimnet = qsimnet
        self.local_sim = local_sim
        self.min_det_score = min_det_score
        self.trunk_grad_scale = trunk_grad_scale
        self.sim_on_people = sim_on_people

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        q = cfg.MODEL.QEEPS
        channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8  # res5 output
        num_pids = q.OIM.NUM_PIDS
        if num_pids <= 0:
            raise ValueError("MODEL.QEEPS.OIM.NUM_PIDS must be > 0: set it, or build the config "
                             "with qeeps_d2.engine.setup_cfg, which counts the identities of "
                             "DATASETS.TRAIN (their files must be readable)")
        ret.update(
            reid_head=ReIDHead(channels, q.EMBED_DIM),
            oim_loss=OIMLoss(
                num_pids,
                q.OIM.QUEUE_SIZE,
                emb_dim=q.EMBED_DIM,
                scalar=q.OIM.SCALAR,
                momentum=q.OIM.MOMENTUM,
            ),
            qsimnet=QSimNet(q.EMBED_DIM, q.QSIMNET.INIT) if q.QSIMNET.ENABLED else None,
            local_sim=_local_sim_from_config(cfg),
            min_det_score=(cfg.TEST.PERSON_SEARCH.DET_THRESH if q.QSIMNET.MIN_DET_SCORE < 0
                           else q.QSIMNET.MIN_DET_SCORE),
            trunk_grad_scale=q.OIM.TRUNK_GRAD_SCALE,
            sim_on_people=q.QSIMNET.LOSS_ON_PEOPLE,
            separate_det_head=_det_head_mode(q.DET_HEAD) == "separate",
        )
        ret.update(_id_pooler_from_config(cfg, input_shape))
        return ret

    def attach_trunk(self, backbone: nn.Module) -> None:
        """Give the identity path the backbone that continues boxes pooled at ``id_in_feature``
        (its ``forward_from``) and, with MODEL.QEEPS.ID_POOLER.OWN_STAGES, make ``id_trunk``:
        copies of the stages after it (same parameter names under ``roi_heads.id_trunk.``;
        without QSSE weights: their QSSE blocks replay the backbone's gates). A no-op without
        MODEL.QEEPS.ID_POOLER."""
        if self.id_pooler is None:
            return
        if not hasattr(backbone, "stages_after"):
            raise ValueError("MODEL.QEEPS.ID_POOLER needs the QEEPS backbone "
                             "(MODEL.BACKBONE.NAME build_qsse_resnet_backbone)")
        following = backbone.stages_after(self.id_in_feature)  # ValueError: no such stage
        self._trunk = [backbone]
        if self.id_own_stages:
            stages = {n: copy.deepcopy(st) for n, st in following.items()}
            for st in stages.values():
                for block in st:
                    if hasattr(block, "qsse"):
                        block.qsse = None
            self.id_trunk = nn.ModuleDict(stages)

    @property
    def _identity_trunk(self) -> List[nn.Module]:
        """The modules the identity path runs after its pooler: backbone stages (or their
        copies), then res5."""
        if self.id_pooler is None:
            return [self.res5]
        stages = (self.id_trunk if self.id_trunk is not None
                  else self._trunk[0].stages_after(self.id_in_feature))
        return list(stages.values()) + [self.res5]

    def identity_features(self, x: torch.Tensor, image_index: Optional[torch.Tensor] = None,
                          return_map: bool = False):
        """(R, C, h, w) boxes at ``id_in_feature`` (ROI-pooled, or crops run up to that stage)
        -> (R, C5): the later stages (MODEL.QEEPS.ID_POOLER), res5, mean over space.
        ``image_index`` (R,): the image of each row, for the QSSE gates of a paired forward.
        ``return_map``: also return the (R, C4, h4, w4) map res5 starts from (the cells of
        MODEL.QEEPS.QSIMNET.LOCAL)."""
        if not self._trunk:
            raise RuntimeError("MODEL.QEEPS.ID_POOLER needs the backbone: call attach_trunk()")
        stages = None if self.id_trunk is None else list(self.id_trunk.values())
        x = self._trunk[0].forward_from(x, self.id_in_feature, image_index, stages)
        pooled = self.res5(x).mean(dim=(2, 3))
        return (pooled, x) if return_map else pooled

    def _pooled_res5(self, res5: nn.Module, features: Dict[str, torch.Tensor],
                     boxes: List[Boxes]) -> torch.Tensor:
        """(sum of boxes, C5): ``res5`` on the ROI-pooled boxes, averaged over space."""
        return res5(self.pooler([features[f] for f in self.in_features], boxes)).mean(dim=(2, 3))

    def box_features(self, features: Dict[str, torch.Tensor], boxes: List[Boxes],
                     return_map: bool = False):
        """(sum of boxes, C5): the identity path's features: ``res5`` on the boxes pooled as the
        detector pools them or, with MODEL.QEEPS.ID_POOLER, pooled from ``id_in_feature`` and
        continued through the later backbone stages first. ``return_map`` (ID_POOLER only):
        also the map before res5, see :meth:`identity_features`."""
        if self.id_pooler is None:
            if return_map:
                raise ValueError("cell maps need MODEL.QEEPS.ID_POOLER")
            return self._pooled_res5(self.res5, features, boxes)
        x = self.id_pooler([features[self.id_in_feature]], boxes)
        counts = torch.as_tensor([len(b) for b in boxes], device=x.device)
        image_index = torch.repeat_interleave(torch.arange(len(boxes), device=x.device), counts)
        return self.identity_features(x, image_index, return_map)

    def det_box_features(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]
                         ) -> torch.Tensor:
        """(sum of boxes, C5): the features ClsNet and RegNet see; those of :meth:`box_features`
        unless the detection head has its own res5 (MODEL.QEEPS.DET_HEAD "separate")."""
        return self._pooled_res5(self.det_res5 if self.separate_det_head else self.res5,
                                 features, boxes)

    @property
    def separate_det_head(self) -> bool:
        return self.det_res5 is not None

    def embed(self, box_features: torch.Tensor, stats_mask: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
        """(R, C5) -> (R, D) re-id embeddings; in training the gradient reaching the shared
        features is scaled by MODEL.QEEPS.OIM.TRUNK_GRAD_SCALE and ``stats_mask`` (foreground
        rows) gives the normalisation statistics (see :class:`ReIDHead`)."""
        if self.training and self.trunk_grad_scale != 1.0:
            box_features = _ScaleGrad.apply(box_features, self.trunk_grad_scale)
        return self.reid_head(box_features, stats_mask)

    @contextmanager
    def _running_statistics(self):
        """Within: the identity path after its pooler (res5, and the backbone stages it runs with
        MODEL.QEEPS.ID_POOLER) and the re-id head in eval mode, so their BatchNorms normalise
        with, and do not update, their running statistics (gradients still reach their
        weights)."""
        parts = self._identity_trunk + [self.reid_head]
        modules = [m for part in parts for m in part.modules()]
        modes = [m.training for m in modules]
        for part in parts:
            part.train(False)
        try:
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode

    def embed_boxes(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        """Re-id embeddings (sum of boxes, D) of given boxes, e.g. the query boxes, computed as
        at test time even in training: res5 and the re-id head use their running statistics and
        leave them unchanged (in pair training the B query boxes would otherwise be normalised
        with their own statistics, about +-1 per dimension for 2-4 rows, and write those into
        the running ones). The gradient still reaches every weight."""
        with self._running_statistics():
            return self.embed(self.box_features(features, boxes))

    def describe_boxes(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]):
        """As :meth:`embed_boxes`, plus each box's cells for MODEL.QEEPS.QSIMNET.LOCAL:
        (sum of boxes, D) embeddings and (sum of boxes, P, d) cell descriptors, or None
        without the local head."""
        if not self.local_fitted:
            return self.embed_boxes(features, boxes), None
        with self._running_statistics():
            pooled, maps = self.box_features(features, boxes, return_map=True)
            return self.embed(pooled), self.local_sim.cells(maps)

    @property
    def local_fitted(self) -> bool:
        """A fitted MODEL.QEEPS.QSIMNET.LOCAL head: boxes are described with cells too."""
        return self.local_sim is not None and self.local_sim.fitted

    def query_similarity(self, query_embeds: torch.Tensor, embeds: torch.Tensor,
                         query_cells: Optional[torch.Tensor] = None,
                         cells: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(M,) similarity of M boxes (``embeds`` (M, D), ``cells`` (M, P, d)) to one query
        (``query_embeds`` (1, D), ``query_cells`` (1, P, d)): the local head's when it is
        fitted and given cells, else QSimNet's probability, else the cosine."""
        if self.local_sim is not None and query_cells is not None and cells is not None:
            return self.local_sim(query_cells, cells, query_embeds, embeds)
        if self.qsimnet is not None:
            return self.qsimnet.similarity(query_embeds, embeds)
        return embeds @ query_embeds[0]

    def _describe_per_image(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]):
        """Embeddings and (with a fitted local head) cells of given boxes per image: two lists of
        (M_i, D) and (M_i, P, d) (None entries without a fitted head, and while traced for ONNX
        export, which exports the embeddings only)."""
        num = [len(b) for b in boxes]
        if not self.local_fitted or torch.jit.is_tracing() or not sum(num):
            return self._embed_per_image(features, boxes), [None] * len(num)
        pooled, maps = self.box_features(features, boxes, return_map=True)
        return list(self.embed(pooled).split(num)), list(self.local_sim.cells(maps).split(num))

    def forward_given_boxes(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        query_embeds: Optional[torch.Tensor] = None,
        query_cells: Optional[torch.Tensor] = None,
    ) -> List[Instances]:
        """Inference on given boxes (evaluation with ground-truth boxes): each box is a
        detection as it is; no box regression, no NMS, no score threshold.

        Args:
            features: backbone features of B images.
            proposals: B ``Instances`` with ``proposal_boxes`` (M_i, 4) XYXY in image pixels.
            query_embeds: (B, D) embedding of each image's query (pair mode), or None.
            query_cells: (B, P, d) cells of each image's query for the local head, or None.
        Returns:
            B ``Instances`` (the proposals' image sizes), one row per given box in order:
            ``pred_boxes`` (the box), ``scores`` (ClsNet person probability), ``pred_classes``
            (0), ``pred_embeds`` (M_i, D) and, with a query, ``pred_sims`` (M_i,) (see
            :meth:`query_similarity`: the fitted local head's score, QSimNet's probability, or
            the cosine with the query embedding); without a query and with a fitted local head,
            ``pred_cells`` (M_i, P, d).
        """
        num = [len(p) for p in proposals]
        boxes = [p.proposal_boxes for p in proposals]
        cells = [None] * len(num)
        if sum(num):
            feats = self.det_box_features(features, boxes)
            probs = self.box_predictor.predict_probs(self.box_predictor(feats), proposals)
            if self.local_fitted:  # cells for the pair score, or pred_cells without a query
                embeds, cells = self._describe_per_image(features, boxes)
            else:
                embeds = (self._embed_per_image(features, boxes) if self.separate_det_head
                          else self.embed(feats).split(num))
        else:  # no box at all: nothing to pool
            device = next(iter(features.values())).device
            probs = [torch.zeros(0, self.num_classes + 1, device=device)] * len(num)
            embeds = self._embed_per_image(features, boxes)
        results = []
        for i, (p, prob, emb, cel) in enumerate(zip(proposals, probs, embeds, cells)):
            res = Instances(p.image_size)
            res.pred_boxes = p.proposal_boxes.clone()
            res.scores = prob[:, 0]
            res.pred_classes = torch.zeros(len(p), dtype=torch.int64, device=emb.device)
            res.pred_embeds = emb
            if query_embeds is None and cel is not None:
                res.pred_cells = cel
            if query_embeds is not None:
                qc = None if query_cells is None else query_cells[i : i + 1]
                res.pred_sims = self.query_similarity(query_embeds[i : i + 1], emb, qc, cel)
            results.append(res)
        return results

    def forward(
        self,
        images,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
        query_embeds: Optional[torch.Tensor] = None,
        query_cells: Optional[torch.Tensor] = None,
    ):
        """
        Args:
            images, features, proposals, targets: as for ``Res5ROIHeads`` (B gallery images).
            query_embeds: (B, D) embedding of each image's query (pair mode), or None.
            query_cells: (B, P, d) cells of each image's query for the local head (inference
                with a fitted MODEL.QEEPS.QSIMNET.LOCAL head), or None.
        Returns:
            training: ([], losses) with loss_cls, loss_box_reg, loss_oim (+ loss_sim).
            inference: (list of B Instances with pred_boxes, scores, pred_classes, pred_embeds
            and, with a query, pred_sims; without one and with a fitted local head, pred_cells
            (N, P, d)), {}.
        """
        del images
        if self.training:
            if not targets:
                raise ValueError("QEEPSROIHeads requires targets in training")
            proposals = self.label_and_sample_proposals(proposals, targets)
        boxes = [p.proposal_boxes for p in proposals]
        feats = self.det_box_features(features, boxes)
        predictions = self.box_predictor(feats)
        if not self.training:
            # separate detection head: the identity path embeds the final (regressed) boxes
            embeds = None if self.separate_det_head else self.embed(feats)
            return self._inference(features, predictions, proposals, query_embeds, embeds,
                                   query_cells), {}
        gt_classes = torch.cat([p.gt_classes for p in proposals])
        foreground = (gt_classes >= 0) & (gt_classes < self.num_classes)
        if not self.separate_det_head:
            embeds = self.embed(feats, foreground)
        else:  # the identity res5 runs only on the rows a loss reads
            rows = foreground
            if self.qsimnet is not None and query_embeds is not None and not self.sim_on_people:
                rows = torch.ones_like(foreground)
            picked = [b[m] for b, m in zip(boxes, rows.split([len(b) for b in boxes]))]
            embeds = feats.new_zeros(len(feats), self.reid_head.proj.out_features)
            if rows.any():
                embeds[rows] = self.embed(self.box_features(features, picked), foreground[rows])
        return [], self._losses(predictions, embeds, proposals, query_embeds)

    def _embed_per_image(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]
                         ) -> List[torch.Tensor]:
        """Embeddings of given boxes per image: a list of (M_i, D) (empty ones included)."""
        num = [len(b) for b in boxes]
        # traced (ONNX export, qeeps_d2.export): the general path, one graph for any number of
        # boxes (the exported graph runs it on none too), not the branch of the traced input
        if torch.jit.is_tracing() or sum(num):
            return list(self.embed(self.box_features(features, boxes)).split(num))
        device = next(iter(features.values())).device
        return [torch.zeros(0, self.reid_head.proj.out_features, device=device)] * len(num)

    def _losses(self, predictions, embeds, proposals, query_embeds) -> Dict[str, torch.Tensor]:
        losses = self.box_predictor.losses(predictions, proposals)
        gt_classes = torch.cat([p.gt_classes for p in proposals])
        fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        pids = _cat_field(proposals, "gt_pids", -1)
        losses["loss_oim"] = self.oim_loss(embeds[fg], pids[fg])
        if self.qsimnet is not None and query_embeds is not None:
            image_index = torch.cat(
                [torch.full((len(p),), i, device=embeds.device) for i, p in enumerate(proposals)]
            )
            labels = fg & _cat_field(proposals, "gt_is_query", 0).bool()
            rows = fg if self.sim_on_people else torch.ones_like(fg)
            logits = self.qsimnet(query_embeds[image_index][rows], embeds[rows])
            labels = labels[rows]
            # no ROI at all (no proposal survived and no person to add): a zero, not the NaN
            # of a mean over nothing
            losses["loss_sim"] = (F.cross_entropy(logits, labels.long()) if len(logits)
                                  else logits.sum() * 0.0)
        return losses

    def _inference(self, features, predictions, proposals, query_embeds, embeds=None,
                   query_cells=None) -> List[Instances]:
        """Detections of B images. ``embeds`` (R, D): embeddings of the proposals, whose kept
        rows the detections take (one shared res5); None: the identity path embeds the final
        regressed boxes themselves (separate detection head)."""
        num_per_image = [len(p) for p in proposals]
        if query_embeds is None:  # query-agnostic: the stock score threshold and score NMS
            results, kept = self.box_predictor.inference(predictions, proposals)
            cells = [None] * len(results)
            if embeds is not None:
                per_image = [e[k] for e, k in zip(embeds.split(num_per_image), kept)]
            else:
                # with a fitted local head the detections also carry its cells (pred_cells): a
                # cascade's first stage ranks them with it (agnostic_similarity)
                per_image, cells = self._describe_per_image(
                    features, [r.pred_boxes for r in results])
            for res, emb, cel in zip(results, per_image, cells):
                res.pred_embeds = emb
                if cel is not None:
                    res.pred_cells = cel
            return results
        # Pair mode (every query-guided model): ClsNet only removes detections scoring <
        # min_det_score (by default the protocol's TEST.PERSON_SEARCH.DET_THRESH, see
        # MODEL.QEEPS.QSIMNET.MIN_DET_SCORE); the query similarity (query_similarity: the local
        # head's, QSimNet's or the cosine) ranks the rest and drives their NMS, so of overlapping
        # boxes the one most like the query survives (README: query-ranked NMS).
        boxes = self.box_predictor.predict_boxes(predictions, proposals)
        probs = self.box_predictor.predict_probs(predictions, proposals)
        candidates = []
        for i, p in enumerate(proposals):
            det = probs[i][:, 0]
            bxs = Boxes(boxes[i][:, :4])
            bxs.clip(p.image_size)
            keep = torch.nonzero(
                (det >= self.min_det_score) & torch.isfinite(bxs.tensor).all(dim=1)
            ).squeeze(1)
            candidates.append((bxs[keep], det[keep], keep))
        if embeds is None:  # as in the query-agnostic branch: cells iff a fitted local head
            cand_embeds, cand_cells = self._describe_per_image(features, [c[0] for c in candidates])
        else:
            cand_embeds = [e[c[2]] for e, c in zip(embeds.split(num_per_image), candidates)]
            cand_cells = [None] * len(candidates)
        results = []
        for i, (p, (bxs, det, _), emb, cel) in enumerate(
                zip(proposals, candidates, cand_embeds, cand_cells)):
            qc = None if query_cells is None else query_cells[i : i + 1]
            sims = self.query_similarity(query_embeds[i : i + 1], emb, qc, cel)
            keep = batched_nms(bxs.tensor, sims, torch.zeros_like(sims, dtype=torch.long),
                               self.box_predictor.test_nms_thresh)
            keep = keep[: self.box_predictor.test_topk_per_image]
            res = Instances(p.image_size)
            res.pred_boxes = bxs[keep]
            res.scores = det[keep]
            res.pred_classes = torch.zeros_like(keep)
            res.pred_embeds = emb[keep]
            res.pred_sims = sims[keep]
            results.append(res)
        return results


def _local_sim_from_config(cfg) -> Optional[LocalSimilarity]:
    """The local head of MODEL.QEEPS.QSIMNET.LOCAL (QSimNet rows with an identity path of its
    own stages only), or None."""
    q = cfg.MODEL.QEEPS
    if not q.QSIMNET.LOCAL.ENABLED:
        return None
    if not q.QSIMNET.ENABLED or not q.ID_POOLER.IN_FEATURE or not q.ID_POOLER.OWN_STAGES:
        raise ValueError("MODEL.QEEPS.QSIMNET.LOCAL needs MODEL.QEEPS.QSIMNET.ENABLED and an "
                         "identity path with its own stages (MODEL.QEEPS.ID_POOLER.IN_FEATURE, "
                         "OWN_STAGES)")
    # checked here, when the model is built, not when the fit runs at the end of training
    local = q.QSIMNET.LOCAL
    for key, value, low in (("DIM", local.DIM, 1), ("FIT_ITERS", local.FIT_ITERS, 0),
                            ("FIT_BATCH", local.FIT_BATCH, 1), ("HARD_POOL", local.HARD_POOL, 1),
                            ("HARD_NEGATIVES", local.HARD_NEGATIVES, 0),
                            ("RANDOM_NEGATIVES", local.RANDOM_NEGATIVES, 0)):
        if value < low:
            raise ValueError(f"MODEL.QEEPS.QSIMNET.LOCAL.{key} must be >= {low}, got {value}")
    if not local.LR > 0:
        raise ValueError(f"MODEL.QEEPS.QSIMNET.LOCAL.LR must be > 0, got {local.LR}")
    # the identity path's map before res5 has res4's channels
    return LocalSimilarity(cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 4, local.DIM)


def _det_head_mode(mode: str) -> str:
    if mode not in ("shared", "separate"):
        raise ValueError(f"MODEL.QEEPS.DET_HEAD must be 'shared' or 'separate', got {mode!r}")
    return mode


def _id_pooler_from_config(cfg, input_shape) -> Dict:
    """``id_pooler`` / ``id_in_feature`` from MODEL.QEEPS.ID_POOLER (none when IN_FEATURE is
    empty)."""
    c = cfg.MODEL.QEEPS.ID_POOLER
    if not c.IN_FEATURE:
        return {}
    if c.IN_FEATURE not in input_shape:
        raise ValueError(
            f"MODEL.QEEPS.ID_POOLER.IN_FEATURE {c.IN_FEATURE!r} is not a backbone output: add it "
            f"to MODEL.RESNETS.OUT_FEATURES (now {list(input_shape)})")
    pooler = ROIPooler(
        output_size=tuple(c.RESOLUTION),
        scales=(1.0 / input_shape[c.IN_FEATURE].stride,),
        sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
        pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
    )
    return {"id_pooler": pooler, "id_in_feature": c.IN_FEATURE, "id_own_stages": c.OWN_STAGES}


def id_trunk_from_backbone(stage_names: Sequence[str], state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook of the meta architecture (``stage_names`` bound: the stages the
    identity path has copies of): a checkpoint without ``roi_heads.id_trunk`` weights (any but
    one trained with MODEL.QEEPS.ID_POOLER.OWN_STAGES) starts those copies from the backbone's
    stages of the same names (QSSE weights excluded)."""
    dst = prefix + "roi_heads.id_trunk."
    if any(k.startswith(dst) for k in state_dict):
        return
    sources = tuple(f"{prefix}backbone.{name}." for name in stage_names)
    for key in [k for k in state_dict if k.startswith(sources)]:
        rest = key[len(prefix + "backbone."):]
        if ".qsse." not in rest:
            state_dict[dst + rest] = state_dict[key].clone()


def _det_res5_from_res5(state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a checkpoint without ``det_res5`` weights (a model-zoo ResNet,
    the identity pretraining, a shared-head model) starts the detection res5 as a copy of its
    ``res5``."""
    src, dst = prefix + "res5.", prefix + "det_res5."
    if any(k.startswith(dst) for k in state_dict):
        return
    for key in [k for k in state_dict if k.startswith(src)]:
        state_dict[dst + key[len(src):]] = state_dict[key].clone()
