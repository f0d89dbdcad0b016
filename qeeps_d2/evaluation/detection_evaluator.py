"""``DetectionEvaluator``: detection AP and recall of the query-agnostic gallery detections.

Collects the detections (``score >= det_thresh``) of gallery-image outputs and scores them with
:func:`qeeps_d2.evaluation.detection_metrics.evaluate_detections` against the data set's dicts
(OIM's ``psdb.py`` rules). Returns ``{"detection": {"AP", "recall", "labeled_recall" (percent),
"partial"}}``, or nothing when no gallery-image output was seen (pair runs) or with ground-truth
boxes (detection would be trivially perfect). In a cascade the gallery images run in the first
stage, so that is where the metrics come from.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import numpy as np

from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.dataset_dicts import detection_ground_truth
from ..data.search_inputs import check_query_indices
from ..data.search_protocol import SearchProtocol
from ..utils.records import record_kind
from .detection_metrics import evaluate_detections
from .search_evaluator import kept_detections, queries_label, warn_missing

__all__ = ["DetectionEvaluator"]

logger = logging.getLogger(__name__)


class DetectionEvaluator(DatasetEvaluator):
    """Detection AP / recall over the evaluated queries' gallery images (module docstring)."""

    def __init__(self, dataset_name: str, protocol: SearchProtocol, det_thresh: float = 0.5,
                 query_indices: Optional[Sequence[int]] = None, distributed: bool = True,
                 first_stage: bool = False):
        """``first_stage``: the detections come from a cascade's first stage (log label)."""
        self.dataset_name = dataset_name
        self.protocol = protocol
        self.det_thresh = float(det_thresh)
        self.query_indices = check_query_indices(protocol, query_indices)
        self._distributed = distributed
        self._first_stage = first_stage
        self.reset()

    def reset(self):
        self._detections: Dict[str, np.ndarray] = {}  # image -> (N, 5) [x1, y1, x2, y2, score]

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if record_kind(inp) == "gallery" and "given_boxes" not in inp:
                boxes, scores, _ = kept_detections(inp, out["instances"], self.det_thresh,
                                                   False, self.dataset_name)
                self._detections[inp["image_id"]] = np.c_[boxes, scores]

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            parts = comm.gather(self._detections, dst=0)
            if not comm.is_main_process():
                return {}
            self._detections = {k: v for part in parts for k, v in part.items()}
        if not self._detections:
            return {}
        wanted = set(self.protocol.gallery_images(self.query_indices))
        ground_truth = detection_ground_truth(DatasetCatalog.get(self.dataset_name), wanted)
        warn_missing(
            self.dataset_name,
            "gallery images are not in the data set's dicts; left out of the detection metrics",
            sorted(wanted - set(ground_truth)), len(wanted),
        )
        detections = {n: d for n, d in self._detections.items() if n in ground_truth}
        det = evaluate_detections(ground_truth, detections, self.det_thresh)
        partial = len(self.query_indices) < len(self.protocol)
        result = OrderedDict(AP=100 * det["ap"], recall=100 * det["recall"],
                             labeled_recall=100 * det["labeled_recall"], partial=partial)
        label = queries_label(len(self.query_indices), len(self.protocol))
        logger.info("Detection on %s (%s): AP %.2f  recall %.2f  labeled recall %.2f",
                    self.dataset_name, label + (", first stage" if self._first_stage else ""),
                    result["AP"], result["recall"], result["labeled_recall"])
        return OrderedDict(detection=result)
