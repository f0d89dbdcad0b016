"""The person-search evaluator of a config: search, proposal recall and detection evaluators
combined with Detectron2's ``DatasetEvaluators``, and the metrics file they share."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm

from ..config import cascade_topk
from ..data.build import evaluated_queries, load_test_protocol
from ..data.search_protocol import SearchProtocol
from .cascade_inference import CascadeState
from .detection_evaluator import DetectionEvaluator
from .proposal_recall import ProposalRecallEvaluator
from .search_evaluator import PersonSearchEvaluator

__all__ = ["PersonSearchEvaluators", "build_person_search_evaluator"]

logger = logging.getLogger(__name__)


class PersonSearchEvaluators(DatasetEvaluators):
    """:class:`PersonSearchEvaluator` + :class:`ProposalRecallEvaluator` +
    :class:`DetectionEvaluator` on one protocol; after a run that scored the search, all their
    metrics also go to ``<output_dir>/<dataset_name>[_gtboxes]_metrics.json`` with the
    protocol, mode (and cascade fields) of the run.

    Args: ``dataset_name``, ``protocol`` and the keyword arguments of
    :class:`PersonSearchEvaluator` (``output_dir``, ``det_thresh``, ``query_indices``,
    ``distributed``, ``use_gt_boxes``), which the other two share; ``cascade_topk`` K > 0 for a
    cascade evaluation (:attr:`cascade` is then its :class:`CascadeState`, to pass to
    :func:`~qeeps_d2.evaluation.cascade_inference.cascade_inference_on_dataset`).
    """

    def __init__(self, dataset_name: str, protocol: SearchProtocol, cascade_topk: int = 0,
                 **search_options):
        if cascade_topk < 0:
            raise ValueError(f"cascade_topk must be >= 0, got {cascade_topk}")
        self.cascade = CascadeState(cascade_topk) if cascade_topk else None
        search = PersonSearchEvaluator(dataset_name, protocol, cascade_state=self.cascade,
                                       **search_options)
        members = [search, ProposalRecallEvaluator(protocol, search.query_indices,
                                                   search.distributed, self.cascade)]
        if not search.use_gt_boxes:  # with the annotated boxes detection is trivially perfect
            members.append(DetectionEvaluator(dataset_name, protocol, search.det_thresh,
                                              search.query_indices, search.distributed,
                                              first_stage=bool(cascade_topk)))
        super().__init__(members)
        self.search = search

    def evaluate(self):
        results = super().evaluate()
        out = self.search.output_dir
        if results and self.search.task in results and out and comm.is_main_process():
            path = os.path.join(out, f"{self.search.file_prefix}_metrics.json")
            with open(path, "w") as f:
                json.dump({**self.search.file_fields(), **results}, f, indent=1)
        return results


def build_person_search_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None
                                  ) -> PersonSearchEvaluators:
    """The evaluator of ``dataset_name`` under ``cfg``'s TEST.PERSON_SEARCH settings (gallery
    size, detection threshold, evaluated queries, cascade K, ground-truth boxes); files go to
    ``output_folder`` (default ``OUTPUT_DIR/inference``)."""
    protocol = load_test_protocol(cfg, dataset_name)
    ps = cfg.TEST.PERSON_SEARCH
    return PersonSearchEvaluators(
        dataset_name,
        protocol,
        output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"),
        det_thresh=ps.DET_THRESH,
        query_indices=evaluated_queries(cfg, protocol),
        cascade_topk=cascade_topk(cfg),
        use_gt_boxes=ps.USE_GT_BOXES,
    )
