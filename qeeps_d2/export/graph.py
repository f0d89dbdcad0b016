"""The query-agnostic path of a QEEPS model as one traceable module with tensor inputs/outputs.

:class:`QueryAgnosticGraph` runs what ``QEEPS.inference`` runs for a gallery image (the OIM
baseline: backbone, RPN, ROI box head with its NMS, re-id head on the final boxes, rescaling to
the original size) and for query boxes of the same image, sharing one backbone pass. It calls
the model's own modules; only the input layout (HWC uint8 BGR) and the packing of the outputs
are its own. It is what :func:`qeeps_d2.export.export_onnx` traces.

For a query-guided model it computes the query-agnostic first stage of a cascade (no query
branch: the QSSE blocks run as plain residual blocks, the RPN without the QRPN objectness, no
QSimNet), exactly what ``QEEPS.inference`` computes for a gallery image without a query.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes

__all__ = ["QueryAgnosticGraph"]


class QueryAgnosticGraph(nn.Module):
    """Detections with embeddings, and embeddings of given boxes, for ONE image.

    Args:
        model: a built ``QEEPS`` model in eval mode (see
            :func:`qeeps_d2.export.check_exportable`).
        input_format: the model's ``INPUT.FORMAT``, "BGR" or "RGB": the graph takes BGR and
            reverses the channels for an RGB model (the test mapper resizes each channel alone,
            so converting after the resize is exact).
    """

    def __init__(self, model: nn.Module, input_format: str):
        super().__init__()
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT {input_format!r}: only BGR and RGB models export")
        self.model = model
        self.rgb = input_format == "RGB"

    def forward(self, image: torch.Tensor, original_size: torch.Tensor, query_boxes: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            image: (H, W, 3) uint8 BGR, resized as the test mapper resizes.
            original_size: (2,) int64 (height, width) of the frame before resizing.
            query_boxes: (M, 4) float32 XYXY in ``image`` pixels (M may be 0).
        Returns:
            boxes (N, 4) float32 XYXY in original pixels, scores (N,), embeddings (N, D) and
            query embeddings (M, D), L2-normalised.
        """
        model = self.model
        x = image.permute(2, 0, 1)
        if self.rgb:
            x = x.flip(0)
        images = model.preprocess_image([{"image": x}])  # normalise (and pad, if configured)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        results, _ = model.roi_heads(images, features, proposals, None)
        query_embeds = model.roi_heads.embed_boxes(features, [Boxes(query_boxes)])
        # GeneralizedRCNN._postprocess: to the original size, clipped, empty boxes dropped
        found = detector_postprocess(results[0], original_size[0], original_size[1])
        return found.pred_boxes.tensor, found.scores, found.pred_embeds, query_embeds
