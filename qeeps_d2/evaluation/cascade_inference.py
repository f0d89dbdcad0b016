"""Running a cascade evaluation: the stage state its evaluators share, and the two-run driver.

A query-guided model's cascade (:mod:`qeeps_d2.evaluation.cascade`) runs Detectron2's
``inference_on_dataset`` twice with the same evaluators: first on the query-agnostic records
(gallery images and query boxes), then on the pairs of the per-query shortlists the first run
chose. :class:`CascadeState` holds what passes from the first run to the second (the stage, the
first-stage rows, shortlist, scores, gallery detections and proposal hits); the evaluators that
take part (:class:`~qeeps_d2.evaluation.search_evaluator.PersonSearchEvaluator`,
:class:`~qeeps_d2.evaluation.proposal_recall.ProposalRecallEvaluator`) hold a reference to it.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

from detectron2.utils import comm

__all__ = ["CascadeState", "cascade_inference_on_dataset"]


class CascadeState:
    """The stage of a cascade evaluation and what its first stage leaves for the second.

    Attributes:
        topk: K, the gallery images re-scored per query.
        stage: 1 while the query-agnostic records run, 2 while the pairs run.
        shortlist: query index -> the gallery images to re-score (every rank, after stage 1).
        first_stage_rows: query index -> image -> (N, 6) first-stage rows (main process).
        gallery_detections: image -> (N, 5) first-stage detections (main process).
        first_stage_map, first_stage_top1: the first stage's scores in percent (main process).
        first_stage_recall_hits: (query, gallery entry) -> covered by a first-stage proposal.
    """

    def __init__(self, topk: int):
        if topk < 1:
            raise ValueError(f"a cascade re-scores K >= 1 gallery images per query, got {topk}")
        self.topk = int(topk)
        self.start()

    def start(self) -> None:
        """Forget any earlier run: the next run is a first stage."""
        self.stage = 1
        self.shortlist: Optional[Dict[int, List[str]]] = None
        self.first_stage_rows: Dict[int, Dict[str, np.ndarray]] = {}
        self.gallery_detections: Optional[Dict[str, np.ndarray]] = None
        self.first_stage_map = self.first_stage_top1 = float("nan")
        self.first_stage_recall_hits: Dict = {}

    def set_first_stage(self, rows, shortlist, gallery_detections, mean_ap: float, top1: float):
        """Record the first stage's outcome (main process)."""
        self.first_stage_rows, self.shortlist = rows, shortlist
        self.gallery_detections = gallery_detections
        self.first_stage_map, self.first_stage_top1 = mean_ap, top1

    def to_second_stage(self, distributed: bool = True) -> Dict[int, List[str]]:
        """Share the main process's shortlist with every rank and switch to stage 2; returns
        the shortlist."""
        if distributed and comm.get_world_size() > 1:
            self.shortlist = comm.all_gather(self.shortlist)[0]
        if self.shortlist is None:
            raise RuntimeError("the cascade's first stage gave no shortlist: is the search "
                               "evaluator among the evaluators?")
        self.stage = 2
        return self.shortlist


def cascade_inference_on_dataset(
    model,
    first_stage_loader: Iterable,
    pair_loader_for: Callable[[Dict[int, List[str]]], Iterable],
    evaluator,
    state: CascadeState,
):
    """Run a cascade evaluation (both stages) through Detectron2's ``inference_on_dataset``.

    Args:
        model: a query-guided QEEPS model (it runs gallery images and query boxes without query
            guidance, pairs with it).
        first_stage_loader: the query-agnostic records (``build_search_records(..., "agnostic")``
            through the mapper) of the evaluated queries.
        pair_loader_for: shortlist (query index -> images) -> loader of those pairs
            (``build_search_records(..., "pairs", shortlist=...)``); called on every rank with
            the same shortlist.
        evaluator: a ``DatasetEvaluator`` (usually
            :func:`~qeeps_d2.evaluation.build.build_person_search_evaluator`'s) whose cascade
            members share ``state``.
        state: the cascade's state.

    Returns:
        the metrics of both runs (detection from the first, search and recall from the
        second) on the main process, ``{}`` on the others.
    """
    from detectron2.evaluation import inference_on_dataset

    state.start()
    first = inference_on_dataset(model, first_stage_loader, evaluator)
    second = inference_on_dataset(model, pair_loader_for(state.to_second_stage()), evaluator)
    return {**(first or {}), **(second or {})}
