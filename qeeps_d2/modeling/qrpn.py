"""QRPN (paper Sec. 4.2): a query-guided objectness summed per anchor with the stock RPN's.

Shapes (C4 model, one feature map): B gallery images, C channels of ``res4``, A anchors per
location, Hi x Wi the feature size, P the query pooling resolution.

    query box -> ROIAlign on the query's res4 -> (B, C, P, P) -> FC1 over all C*P*P values -> relu
    -> FC2 -> sigmoid -> w (B, C);  gallery res4 * w  -> objectness head -> (B, A, Hi, Wi)

The query-guided objectness is added to the stock RPN objectness of the same anchors; NMS runs on
the sum; box deltas come from the stock RPN only (QRPN has no regression). L_qrpn is a binary
cross-entropy on 128 sampled anchors per image: positives overlap the query person in the gallery
image (IoU >= 0.6), negatives overlap NO person (IoU < 0.3 with all of them), so other people are
never negatives (they are positives of the parallel stock RPN).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

__all__ = ["QueryExcitation", "ObjectnessHead", "QueryGuidedRPN"]


class QueryExcitation(nn.Module):
    """FC1 over the whole pooled query map, relu, FC2, sigmoid: (B, C, P, P) -> (B, C)."""

    def __init__(self, channels: int, resolution: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels * resolution * resolution, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled.flatten(1)))))


class ObjectnessHead(nn.Module):
    """The RPN head of QRPN without regression: 3x3 conv, relu, 1x1 conv to A logits."""

    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.objectness_logits = nn.Conv2d(channels, num_anchors, kernel_size=1)
        for layer in (self.conv, self.objectness_logits):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """list of (B, C, Hi, Wi) -> list of (B, A, Hi, Wi)."""
        return [self.objectness_logits(F.relu(self.conv(x))) for x in features]


def _flatten_logits(logits: List[torch.Tensor]) -> List[torch.Tensor]:
    """(B, A, Hi, Wi) -> (B, Hi*Wi*A), the anchor order of Detectron2's RPN."""
    return [x.permute(0, 2, 3, 1).flatten(1) for x in logits]


@PROPOSAL_GENERATOR_REGISTRY.register()
class QueryGuidedRPN(RPN):
    """Detectron2's ``RPN`` plus the query-guided objectness branch (when enabled).

    Without query inputs (or with ``MODEL.QEEPS.QRPN.ENABLED`` off) it is exactly the stock RPN.
    """

    @configurable
    def __init__(
        self,
        *,
        query_pooler: Optional[ROIPooler] = None,
        query_excitation: Optional[nn.Module] = None,
        query_head: Optional[nn.Module] = None,
        qrpn_batch_size_per_image: int = 128,
        qrpn_positive_fraction: float = 0.5,
        qrpn_positive_iou: float = 0.6,
        qrpn_negative_iou: float = 0.3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.enabled = query_head is not None
        if self.enabled:
            self.query_pooler = query_pooler
            self.query_excitation = query_excitation
            self.query_head = query_head
        self.qrpn_batch_size_per_image = qrpn_batch_size_per_image
        self.qrpn_positive_fraction = qrpn_positive_fraction
        self.qrpn_positive_iou = qrpn_positive_iou
        self.qrpn_negative_iou = qrpn_negative_iou

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        q = cfg.MODEL.QEEPS.QRPN
        if not q.ENABLED:
            return ret
        (feature,) = cfg.MODEL.RPN.IN_FEATURES
        shape = input_shape[feature]
        ret.update(
            query_pooler=ROIPooler(
                output_size=q.POOLER_RESOLUTION,
                scales=(1.0 / shape.stride,),
                sampling_ratio=0,
                pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
            ),
            query_excitation=QueryExcitation(shape.channels, q.POOLER_RESOLUTION, q.REDUCTION),
            query_head=ObjectnessHead(shape.channels, ret["anchor_generator"].num_anchors[0]),
            qrpn_batch_size_per_image=q.BATCH_SIZE_PER_IMAGE,
            qrpn_positive_fraction=q.POSITIVE_FRACTION,
            qrpn_positive_iou=q.POSITIVE_IOU,
            qrpn_negative_iou=q.NEGATIVE_IOU,
        )
        return ret

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        gt_instances: Optional[List[Instances]] = None,
        query_features: Optional[Dict[str, torch.Tensor]] = None,
        query_boxes: Optional[List[Boxes]] = None,
        return_plain: bool = False,
    ):
        """
        Args:
            images, features, gt_instances: as for Detectron2's ``RPN`` (B gallery images).
                In training with QRPN, ``gt_instances[i].gt_is_query`` (bool per person) marks
                the query person of pair i in its gallery image.
            query_features: the query branch's features, (B, C, H, W) per name, row i = pair i.
            query_boxes: B ``Boxes`` of one box each, the query person in its query image.
            return_plain: also return the proposals of the stock objectness alone (for the
                detector-recall comparison of the paper's Table 1).
        Returns:
            proposals (list[Instances]) with ``proposal_boxes`` and ``objectness_logits`` (the
            summed logits when QRPN is used), the loss dict (``loss_qrpn`` added) and, with
            ``return_plain``, the plain proposals (the same as ``proposals`` without QRPN).
        """
        if not self.enabled or query_features is None:
            proposals, losses = super().forward(images, features, gt_instances)
            return (proposals, losses, proposals) if return_plain else (proposals, losses)
        features = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(features)
        objectness, anchor_deltas = self.rpn_head(features)
        weights = self.query_excitation(
            self.query_pooler([query_features[f] for f in self.in_features], query_boxes)
        )  # (B, C)
        query_objectness = self.query_head([f * weights[:, :, None, None] for f in features])
        objectness = _flatten_logits(objectness)
        query_objectness = _flatten_logits(query_objectness)
        box_dim = self.anchor_generator.box_dim
        anchor_deltas = [
            # (B, A*4, Hi, Wi) -> (B, Hi*Wi*A, 4), as in the stock RPN
            x.view(x.shape[0], -1, box_dim, x.shape[-2], x.shape[-1])
            .permute(0, 3, 4, 1, 2)
            .flatten(1, -2)
            for x in anchor_deltas
        ]
        losses = {}
        if self.training:
            if gt_instances is None:
                raise ValueError("QueryGuidedRPN requires gt_instances in training")
            gt_labels, gt_boxes = self.label_and_sample_anchors(anchors, gt_instances)
            losses = self.losses(anchors, objectness, gt_labels, anchor_deltas, gt_boxes)
            losses["loss_qrpn"] = self.query_losses(anchors, query_objectness, gt_instances)
        summed = [a + b for a, b in zip(objectness, query_objectness)]
        proposals = self.predict_proposals(anchors, summed, anchor_deltas, images.image_sizes)
        if return_plain:
            plain = self.predict_proposals(anchors, objectness, anchor_deltas, images.image_sizes)
            return proposals, losses, plain
        return proposals, losses

    @torch.no_grad()
    def label_query_anchors(self, anchors: Boxes, instances: Instances) -> torch.Tensor:
        """Labels of all anchors for L_qrpn in one gallery image, before sampling.

        Returns:
            (R,) int64: 1 = IoU >= POSITIVE_IOU with the query person (plus, as in the stock RPN
            matcher, the anchors of highest IoU with it), 0 = IoU < NEGATIVE_IOU with every
            person, -1 = ignored.
        """
        labels = torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
        if len(instances) == 0:
            labels.fill_(0)
            return labels
        iou = pairwise_iou(instances.gt_boxes, anchors)  # (G, R)
        labels[iou.max(dim=0).values < self.qrpn_negative_iou] = 0
        is_query = instances.gt_is_query
        if is_query.any():
            iou_q = iou[is_query].max(dim=0).values  # (R,)
            labels[iou_q >= self.qrpn_positive_iou] = 1
            best = iou_q.max()
            if best > 0:
                labels[iou_q == best] = 1
        return labels

    def query_losses(
        self, anchors: List[Boxes], query_objectness: List[torch.Tensor], gt_instances
    ) -> torch.Tensor:
        """L_qrpn: BCE over ``QRPN.BATCH_SIZE_PER_IMAGE`` sampled anchors per image."""
        anchors = Boxes.cat(anchors)
        labels = []
        for inst in gt_instances:
            lab = self.label_query_anchors(anchors, inst)
            pos, neg = subsample_labels(
                lab, self.qrpn_batch_size_per_image, self.qrpn_positive_fraction, 0
            )
            lab.fill_(-1)
            lab.scatter_(0, pos, 1)
            lab.scatter_(0, neg, 0)
            labels.append(lab)
        labels = torch.stack(labels)  # (B, R)
        storage = get_event_storage()
        storage.put_scalar("qrpn/num_pos_anchors", (labels == 1).sum().item() / len(labels))
        valid = labels >= 0
        loss = F.binary_cross_entropy_with_logits(
            torch.cat(query_objectness, dim=1)[valid], labels[valid].float(), reduction="sum"
        )
        return loss / (self.qrpn_batch_size_per_image * len(labels))
