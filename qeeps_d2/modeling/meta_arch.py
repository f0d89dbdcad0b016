"""The QEEPS meta-architecture: a Siamese Faster R-CNN (ResNet-C4) for person search.

One network, weights shared by the query and gallery branches. With the three query-guidance
switches (``MODEL.QEEPS.{QSSE,QRPN,QSIMNET}.ENABLED``) off it is the OIM baseline.

Inputs (list of dicts, as produced by ``qeeps_d2.data.PersonSearchMapper``); three kinds:

- gallery image: ``image`` (3, H, W), ``height``, ``width``, training ``instances`` with
  ``gt_boxes``, ``gt_classes``, ``gt_pids``. Output ``{"instances": Instances}`` with
  ``pred_boxes``, ``scores``, ``pred_classes``, ``pred_embeds`` (N, D) and, with a fitted
  local head (MODEL.QEEPS.QSIMNET.LOCAL), ``pred_cells`` (N, P, d).
- query box (inference only): ``image`` + ``query_box`` (4,) XYXY in ``image`` pixels.
  Output ``{"query_embed": (D,)}``; with a fitted local head also ``query_cells`` (P, d) and
  ``local_params`` (2,) (see ``qeeps_d2.modeling.local_similarity.agnostic_similarity``, the
  similarity of a query to query-agnostic detections).
- pair: a gallery image as above plus ``query_image`` (3, Hq, Wq) and ``query_box`` (4,) in
  ``query_image`` pixels; in training ``instances.gt_is_query`` marks the query person.
  Output instances also carry ``pred_sims`` (N,) (the fitted local head's score, else QSimNet's
  probability, else the cosine);
  ``"proposal_boxes"`` are the proposals actually used (summed objectness with QRPN) and
  ``"plain_proposal_boxes"`` those of the stock objectness alone (Table 1's recall comparison).
- given boxes (inference only, evaluation with ground-truth boxes): a gallery image or a pair
  with ``given_boxes`` (M, 4) XYXY in ``image`` pixels: those boxes are the detections
  (no RPN/QRPN, no box regression, no NMS); output instances hold one row per given box, in
  order, its box rescaled to the original image size (not clipped), ``scores`` = ClsNet person
  probability (see ``QEEPSROIHeads.forward_given_boxes``).

In pair mode the B gallery and B query images run as ONE backbone batch (gallery first), padded
to a common size: that is the weight sharing, and it lets the QSSE blocks couple the branches.
"""
from __future__ import annotations

import functools
from typing import Dict, List

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from ..config import is_query_guided
from ..utils.records import record_kind
from .roi_heads import id_trunk_from_backbone

__all__ = ["QEEPS"]


@META_ARCH_REGISTRY.register()
class QEEPS(GeneralizedRCNN):
    """Siamese ``GeneralizedRCNN`` with query guidance (see the module docstring)."""

    @configurable
    def __init__(self, *, loss_weights: Dict[str, float], qsse: bool, query_guided: bool,
                 oim_start_iter: int = 0, oim_warmup_iters: int = 0,
                 channels_last: bool = False, **kwargs):
        super().__init__(**kwargs)
        if hasattr(self.roi_heads, "attach_trunk"):  # the identity path may continue in it
            self.roi_heads.attach_trunk(self.backbone)
            if self.roi_heads.id_trunk is not None:
                self._register_load_state_dict_pre_hook(
                    functools.partial(id_trunk_from_backbone, list(self.roi_heads.id_trunk)))
        self.loss_weights = dict(loss_weights)
        self.qsse = qsse
        # any query-guidance block on (qeeps_d2.config.is_query_guided): searches pair by pair
        self.query_guided = query_guided
        self.oim_start_iter = oim_start_iter
        self.oim_warmup_iters = oim_warmup_iters
        if channels_last:  # MODEL.QEEPS.CHANNELS_LAST: convolution weights NHWC, so oneDNN / cuDNN
            self.to(memory_format=torch.channels_last)  # give their outputs that layout too

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["loss_weights"] = {k.lower(): float(v) for k, v in cfg.MODEL.QEEPS.LOSS_WEIGHTS.items()}
        ret["qsse"] = cfg.MODEL.QEEPS.QSSE.ENABLED
        ret["query_guided"] = is_query_guided(cfg)
        ret["oim_start_iter"] = cfg.MODEL.QEEPS.OIM.LOSS_START_ITER
        ret["oim_warmup_iters"] = cfg.MODEL.QEEPS.OIM.LOSS_WARMUP_ITERS
        ret["channels_last"] = cfg.MODEL.QEEPS.CHANNELS_LAST
        return ret

    # ------------------------------------------------------------------ helpers
    def _normalize(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
        return [(self._move_to_current_device(x) - self.pixel_mean) / self.pixel_std for x in images]

    def _siamese_features(self, batched_inputs, share_queries: bool = False):
        """Run gallery and query images of B pairs through the shared backbone.

        With ``share_queries`` (inference without QSSE, where the query branch does not depend
        on the gallery image), pairs with the same ``query_index`` run their query image once.

        Returns:
            gallery ImageList, gallery features (B, ...), query features (B, ...) (row i = the
            query of pair i), query boxes (list of B Boxes).
        """
        num = len(batched_inputs)
        if share_queries:
            keys = [x.get("query_index", ("pair", i)) for i, x in enumerate(batched_inputs)]
            first = {}
            for i, k in enumerate(keys):
                first.setdefault(k, i)
            unique = list(first.values())  # input index of each distinct query
            rows = torch.as_tensor([unique.index(first[k]) for k in keys], device=self.device)
        else:
            unique = list(range(num))
            rows = None
        gallery = self._normalize([x["image"] for x in batched_inputs])
        query = self._normalize([batched_inputs[i]["query_image"] for i in unique])
        both = ImageList.from_tensors(
            gallery + query,
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )
        # the image sizes let each QSSE block squeeze an image over its own (unpadded) area
        features = self.backbone(both.tensor, num_pairs=num if self.qsse else 0,
                                 image_sizes=both.image_sizes)
        gallery_feats = {k: v[:num] for k, v in features.items()}
        query_feats = {k: v[num:] if rows is None else v[num:][rows] for k, v in features.items()}
        images = ImageList(both.tensor[:num], both.image_sizes[:num])
        return images, gallery_feats, query_feats, self._query_boxes(batched_inputs)

    def _query_boxes(self, batched_inputs) -> List[Boxes]:
        """One ``Boxes`` holding one box per input: its ``query_box``."""
        return [
            Boxes(torch.as_tensor(x["query_box"], dtype=torch.float32, device=self.device)[None])
            for x in batched_inputs
        ]

    def _weighted(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Apply MODEL.QEEPS.LOSS_WEIGHTS (and the OIM start / warm-up ramp) to the loss dict."""
        weights = dict(self.loss_weights)
        if (self.oim_start_iter > 0 or self.oim_warmup_iters > 0) and "loss_oim" in losses:
            since = get_event_storage().iter - self.oim_start_iter  # iterations since the start
            ramp = 0.0 if since < 0 else min(1.0, (since + 1) / max(self.oim_warmup_iters, 1))
            weights["loss_oim"] = weights.get("loss_oim", 1.0) * ramp
        return {k: v * weights.get(k, 1.0) for k, v in losses.items()}

    # ------------------------------------------------------------------ training
    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        if record_kind(batched_inputs[0]) == "pair":
            images, features, query_feats, query_boxes = self._siamese_features(batched_inputs)
            # as at test time: running BatchNorm statistics, left unchanged (see embed_boxes)
            query_embeds = self.roi_heads.embed_boxes(query_feats, query_boxes)
            proposals, proposal_losses = self.proposal_generator(
                images, features, gt_instances, query_features=query_feats, query_boxes=query_boxes
            )
            _, detector_losses = self.roi_heads(
                images, features, proposals, gt_instances, query_embeds=query_embeds
            )
        else:
            images = self.preprocess_image(batched_inputs)
            features = self.backbone(images.tensor)
            proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
            _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if self.vis_period > 0:
            storage = get_event_storage()
            if storage.iter % self.vis_period == 0:
                self.visualize_training(batched_inputs, proposals)
        return self._weighted({**proposal_losses, **detector_losses})

    # ------------------------------------------------------------------ inference
    def inference(self, batched_inputs: List[Dict], detected_instances=None, do_postprocess=True):
        """Dispatch each input by kind (gallery image, query box, pair); outputs keep the order."""
        if detected_instances is not None:
            raise NotImplementedError("QEEPS does not support detected_instances")
        kinds = [record_kind(x) for x in batched_inputs]
        kinds = [k + "_given" if k != "query" and "given_boxes" in x else k
                 for k, x in zip(kinds, batched_inputs)]
        outputs: List[Dict] = [None] * len(batched_inputs)
        for kind, run in (("gallery", self._infer_gallery), ("query", self._infer_queries),
                          ("pair", self._infer_pairs), ("gallery_given", self._infer_given_boxes),
                          ("pair_given", self._infer_given_boxes)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if idx:
                for i, out in zip(idx, run([batched_inputs[i] for i in idx], do_postprocess)):
                    outputs[i] = out
        return outputs

    def _infer_gallery(self, batched_inputs, do_postprocess=True):
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features, None)
        results, _ = self.roi_heads(images, features, proposals, None)
        if not do_postprocess:
            return [{"instances": r} for r in results]
        outputs = self._postprocess(results, batched_inputs, images.image_sizes)
        self._attach_proposals(outputs, "proposal_boxes", proposals, batched_inputs)
        return outputs

    @staticmethod
    def _attach_proposals(outputs, key, proposals, batched_inputs) -> None:
        """outputs[i][key] = proposal boxes (R, 4) rescaled to the original image size."""
        for out, props, inp in zip(outputs, proposals, batched_inputs):
            h, w = props.image_size
            scale = props.proposal_boxes.tensor.new_tensor(
                [inp.get("width", w) / w, inp.get("height", h) / h] * 2
            )
            out[key] = props.proposal_boxes.tensor * scale

    def _infer_queries(self, batched_inputs, do_postprocess=True):
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        embeds, cells = self.roi_heads.describe_boxes(features, self._query_boxes(batched_inputs))
        if cells is None:
            return [{"query_embed": e} for e in embeds]
        params = self.roi_heads.local_sim.params()
        return [{"query_embed": e, "query_cells": c, "local_params": params}
                for e, c in zip(embeds, cells)]

    def _infer_pairs(self, batched_inputs, do_postprocess=True):
        images, features, query_feats, query_boxes = self._siamese_features(
            batched_inputs, share_queries=not self.qsse
        )
        query_embeds, query_cells = self.roi_heads.describe_boxes(query_feats, query_boxes)
        proposals, _, plain = self.proposal_generator(
            images, features, None, query_features=query_feats, query_boxes=query_boxes,
            return_plain=True,
        )
        results, _ = self.roi_heads(images, features, proposals, None, query_embeds=query_embeds,
                                    query_cells=query_cells)
        if not do_postprocess:
            return [{"instances": r} for r in results]
        outputs = self._postprocess(results, batched_inputs, images.image_sizes)
        self._attach_proposals(outputs, "proposal_boxes", proposals, batched_inputs)
        self._attach_proposals(outputs, "plain_proposal_boxes", plain, batched_inputs)
        return outputs

    def _infer_given_boxes(self, batched_inputs, do_postprocess=True):
        """Gallery images (or pairs, all of one kind) scored on their ``given_boxes``."""
        if record_kind(batched_inputs[0]) == "pair":
            images, features, query_feats, query_boxes = self._siamese_features(
                batched_inputs, share_queries=not self.qsse
            )
            query_embeds, query_cells = self.roi_heads.describe_boxes(query_feats, query_boxes)
        else:
            images = self.preprocess_image(batched_inputs)
            features = self.backbone(images.tensor)
            query_embeds = query_cells = None
        proposals = []
        for x, size in zip(batched_inputs, images.image_sizes):
            p = Instances(size)
            p.proposal_boxes = Boxes(torch.as_tensor(
                x["given_boxes"], dtype=torch.float32, device=self.device).reshape(-1, 4))
            proposals.append(p)
        results = self.roi_heads.forward_given_boxes(features, proposals, query_embeds,
                                                     query_cells)
        if not do_postprocess:
            return [{"instances": r} for r in results]
        outputs = []
        for r, x in zip(results, batched_inputs):
            h, w = r.image_size
            out = Instances((x.get("height", h), x.get("width", w)), **r.get_fields())
            out.pred_boxes.scale(out.image_size[1] / w, out.image_size[0] / h)
            outputs.append({"instances": out})
        return outputs
