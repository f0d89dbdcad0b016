"""``ProposalRecallEvaluator``: the detector recall of the paper's Table 1.

Gallery and pair outputs may carry ``proposal_boxes`` (R, 4) (and, for query-guided models,
``plain_proposal_boxes``, the stock RPN's alone, original-image pixels). The recall is the
fraction of (query, gallery entry) positives of the evaluated queries whose query-person box is
covered by a proposal with IoU >= 0.5: a gallery image's proposals cover the positives of every
query, a pair's only those of its query. Returns ``{"proposal_recall": {"recall",
"plain_recall"}}`` (percent; each only when its proposals were seen).

Cascade (a :class:`~qeeps_d2.evaluation.cascade_inference.CascadeState`): the first stage's hits
are kept in the state; the second stage's (its pairs) replace them where a pair ran, and the
stock RPN's recall is not reported (the first stage has no separate one).
"""
from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.search_inputs import check_query_indices
from ..data.search_protocol import SearchProtocol
from ..utils.records import record_kind
from .box_iou import box_iou
from .search_evaluator import queries_label

__all__ = ["ProposalRecallEvaluator", "RECALLS"]

logger = logging.getLogger(__name__)

# output key of a proposal set -> name of its recall in the results
RECALLS = {"proposal_boxes": "recall", "plain_proposal_boxes": "plain_recall"}


class ProposalRecallEvaluator(DatasetEvaluator):
    """Proposal recall at IoU 0.5 over the protocol's positives (see the module docstring)."""

    def __init__(self, protocol: SearchProtocol, query_indices: Optional[Sequence[int]] = None,
                 distributed: bool = True, cascade_state=None):
        self.protocol = protocol
        self.query_indices = check_query_indices(protocol, query_indices)
        self.cascade = cascade_state
        self._distributed = distributed
        self._positives_by_image: Optional[Dict] = None  # built on first use (_positives)
        self.reset()

    def _positives(self) -> Dict[str, list]:
        """image -> [(query index, gallery entry index, gt box)] over the evaluated queries,
        built on the first output with proposals (a model without proposals never walks the
        galleries)."""
        if self._positives_by_image is None:
            positives = defaultdict(list)
            for i in self.query_indices:
                gallery = self.protocol.gallery(i)
                for k in np.flatnonzero(gallery.positive):
                    positives[gallery.images[k]].append((i, int(k), gallery.gt_boxes[k]))
            self._positives_by_image = dict(positives)
        return self._positives_by_image

    def reset(self):
        # proposal key -> {(query index, gallery entry index): covered by a proposal}
        self._hits: Dict[str, Dict[Tuple[int, int], bool]] = {k: {} for k in RECALLS}

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            kind = record_kind(inp)
            if kind == "query":
                continue
            if not any(key in out for key in RECALLS):
                continue
            query = int(inp["query_index"]) if kind == "pair" else None
            entries = [e for e in self._positives().get(inp["image_id"], ())
                       if query is None or e[0] == query]
            if not entries:
                continue
            gts = np.stack([e[2] for e in entries])
            for key, hits in self._hits.items():
                if key in out:
                    props = out[key].detach().cpu().numpy().astype(np.float64).reshape(-1, 4)
                    covered = (box_iou(gts[:, None], props[None]) >= 0.5).any(axis=1)
                    hits.update(((i, k), bool(c)) for (i, k, _), c in zip(entries, covered))

    def _gather(self) -> bool:
        if not self._distributed:
            return True
        comm.synchronize()
        parts = comm.gather(self._hits, dst=0)
        if not comm.is_main_process():
            return False
        self.reset()
        for hits in parts:
            for key, h in hits.items():
                self._hits[key].update(h)
        return True

    def evaluate(self):
        if not self._gather():
            return {}
        hits = self._hits
        if self.cascade is not None:
            if self.cascade.stage == 1:
                self.cascade.first_stage_recall_hits = dict(hits["proposal_boxes"])
                return {}
            # the pair pass's where a pair ran, the first stage's elsewhere
            hits = {"proposal_boxes": {**self.cascade.first_stage_recall_hits,
                                       **hits["proposal_boxes"]},
                    "plain_proposal_boxes": {}}
        if not any(hits.values()):
            return {}
        num_positives = sum(len(v) for v in self._positives().values())
        recall = OrderedDict(
            (name, 100 * sum(hits[key].values()) / num_positives)
            for key, name in RECALLS.items() if hits[key] and num_positives
        )
        if not recall:
            return {}
        label = queries_label(len(self.query_indices), len(self.protocol))
        logger.info("Detector recall on %s (IoU 0.5, %s): %s", self.protocol.name, label,
                    "  ".join(f"{'proposal ' if n == 'recall' else 'plain proposal '}recall "
                              f"{v:.2f}" for n, v in recall.items()))
        return OrderedDict(proposal_recall=recall)
