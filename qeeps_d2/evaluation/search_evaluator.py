"""``PersonSearchEvaluator``: the search metrics (mAP, top-k) of a Detectron2 evaluation.

It consumes the test records (:func:`qeeps_d2.data.search_inputs.build_search_records`) and the
model's outputs, by record kind (:func:`qeeps_d2.utils.records.record_kind`):

* gallery image -> ``{"instances": pred_boxes, scores, pred_embeds (N, D)}`` (a fitted local
  head: also ``pred_cells`` (N, P, d));
* query -> ``{"query_embed": (D,)}`` (a fitted local head: also ``query_cells``, ``local_params``);
* pair -> ``{"instances": pred_boxes, scores, pred_sims (N,)}``.

Boxes are in original-image pixels. Only detections with ``score >= det_thresh`` are kept (they
are the only ones the protocol can rank), which bounds memory and the size of the results file;
the file records this threshold as ``"min_det_score"``.

``evaluate()`` gathers everything on the main process, builds each evaluated query's rows
``[x1, y1, x2, y2, score, similarity]`` per gallery image (query-agnostic outputs: similarity =
``pred_embeds @ query_embed``, or the local head's score when both sides have cells, see
:func:`qeeps_d2.modeling.local_similarity.agnostic_similarity`), writes
``<output_dir>/<dataset_name>_results.json.gz`` and scores it with
:mod:`qeeps_d2.evaluation.search_metrics`. A gallery image (or pair) without output counts as
"no detection"; missing outputs are reported with a warning since they usually mean a bug.
Proposal recall and detection AP are other evaluators' (:mod:`.proposal_recall`,
:mod:`.detection_evaluator`); :func:`qeeps_d2.evaluation.build.build_person_search_evaluator`
combines the three.

Cascade (a :class:`~qeeps_d2.evaluation.cascade_inference.CascadeState`): in its first stage
(query-agnostic records) the evaluator hands the first-stage rows, scores, gallery detections and
the per-query shortlists to the state and returns nothing; in the second (the shortlisted pairs)
it merges them with the pair rows and writes and scores mode ``"cascade"`` with ``cascade_topk``.

Ground-truth boxes (``use_gt_boxes``, ``TEST.PERSON_SEARCH.USE_GT_BOXES``): gallery and pair
records carry ``given_boxes`` and the model's detections are exactly those boxes; every one is
kept with det_score 1 (the model's ClsNet score is ignored, so no threshold drops an annotated
box). This measures re-identification alone and is labelled everywhere: metrics under
``"person_search_gt_boxes"``, file ``<dataset_name>_gtboxes_results.json.gz`` (with
``"gt_boxes": true``), log lines "with ground-truth boxes". Works in all three modes.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.search_inputs import check_query_indices
from ..data.search_protocol import SearchProtocol
from ..modeling.local_similarity import agnostic_similarity
from ..utils.records import record_kind
from . import cascade
from .results_file import QueryResult, write_results
from .search_metrics import TOP_K, score_search

__all__ = ["PersonSearchEvaluator", "GT_BOXES_TASK", "GT_BOXES_SUFFIX", "kept_detections",
           "queries_label", "warn_missing"]

logger = logging.getLogger(__name__)

# metrics task name and file-name suffix of an evaluation with ground-truth boxes
GT_BOXES_TASK, GT_BOXES_SUFFIX = "person_search_gt_boxes", "_gtboxes"


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def kept_detections(inp, instances, det_thresh: float, use_gt_boxes: bool, dataset_name: str):
    """(boxes (N, 4), det scores (N,), instances on the CPU) of the detections the protocol can
    rank: ``score >= det_thresh``, or with given boxes every box with det score 1."""
    if ("given_boxes" in inp) != use_gt_boxes:
        raise ValueError(
            f"{dataset_name}: record {inp.get('image_id')!r} "
            f"{'has' if 'given_boxes' in inp else 'lacks'} given boxes, but the evaluator "
            f"was built with use_gt_boxes={use_gt_boxes}"
        )
    if use_gt_boxes:
        instances = instances.to("cpu")
        scores = np.ones(len(instances), dtype=np.float32)
        return to_numpy(instances.pred_boxes.tensor), scores, instances
    instances = instances[instances.scores >= det_thresh].to("cpu")
    return to_numpy(instances.pred_boxes.tensor), to_numpy(instances.scores), instances


def queries_label(evaluated: int, total: int) -> str:
    """``"60 queries"``, or ``"partial: 10 of 60 queries"`` for a partial evaluation (log lines)."""
    return f"partial: {evaluated} of {total} queries" if evaluated < total else f"{total} queries"


def warn_missing(dataset_name: str, what: str, missing: list, expected: int) -> None:
    """Warn that ``len(missing)`` of ``expected`` items are missing (louder above 10%)."""
    if missing:
        logger.warning(
            "%s: %d of %d %s (e.g. %s)%s",
            dataset_name, len(missing), expected, what, missing[0],
            " -- MANY are missing: the data loader or the model is likely wrong"
            if len(missing) > 0.1 * expected else "",
        )


class PersonSearchEvaluator(DatasetEvaluator):
    """Scores person search on a :class:`SearchProtocol` (see the module docstring).

    Returns ``{"person_search": {"mAP", "top1", "top5", "top10" (percent), "num_queries",
    "partial" (bool)}}`` (cascade: also ``cascade_topk``, ``num_pairs``, ``first_stage_mAP``,
    ``first_stage_top1``); with ``use_gt_boxes`` under ``"person_search_gt_boxes"``.
    """

    def __init__(
        self,
        dataset_name: str,
        protocol: SearchProtocol,
        output_dir: Optional[str] = None,
        det_thresh: float = 0.5,
        query_indices: Optional[Sequence[int]] = None,
        distributed: bool = True,
        use_gt_boxes: bool = False,
        cascade_state=None,
    ):
        """
        Args:
            dataset_name: registered test set (names the results file).
            protocol: the search protocol to score.
            output_dir: folder of the results file; None writes no file.
            det_thresh: detection-score threshold of the protocol.
            query_indices: evaluate only these queries (partial evaluation); None = all.
            distributed: gather the outputs of all ranks and score on the main process.
            use_gt_boxes: the records carry the gallery images' annotated boxes
                (``given_boxes``): keep every detection with det_score 1 and label the results.
            cascade_state: a :class:`~qeeps_d2.evaluation.cascade_inference.CascadeState` for a
                cascade evaluation (two runs), None for one exhaustive run.
        """
        self.dataset_name = dataset_name
        self.protocol = protocol
        self.output_dir = output_dir
        self.det_thresh = float(det_thresh)
        self.query_indices = check_query_indices(protocol, query_indices)
        self.partial = len(self.query_indices) < len(protocol)
        self.use_gt_boxes = bool(use_gt_boxes)
        self.cascade = cascade_state
        self.file_prefix = dataset_name + (GT_BOXES_SUFFIX if use_gt_boxes else "")
        self.task = GT_BOXES_TASK if use_gt_boxes else "person_search"
        self.distributed = distributed
        self.mode: Optional[str] = None  # of the last evaluation: agnostic, pairs or cascade
        self.reset()

    def reset(self):
        # image_id -> (boxes (N,4), scores (N,), embeds (N,D), cells (N,P,d) or None);
        # query index -> its output ({"query_embed": (D,), ...} as numpy arrays);
        # (query index, image_id) -> (N, 6) rows.
        self._gallery: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray,
                                       Optional[np.ndarray]]] = {}
        self._queries: Dict[int, Dict[str, np.ndarray]] = {}
        self._pairs: Dict[Tuple[int, str], np.ndarray] = {}

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            kind = record_kind(inp)
            if kind == "query":
                self._queries[int(inp["query_index"])] = {
                    k: to_numpy(out[k]) for k in ("query_embed", "query_cells", "local_params")
                    if k in out}
                continue
            boxes, scores, inst = kept_detections(inp, out["instances"], self.det_thresh,
                                                  self.use_gt_boxes, self.dataset_name)
            if kind == "pair":
                rows = np.c_[boxes, scores, to_numpy(inst.pred_sims)].astype(np.float64)
                self._pairs[(int(inp["query_index"]), inp["image_id"])] = rows.reshape(-1, 6)
            else:
                cells = to_numpy(inst.pred_cells) if inst.has("pred_cells") else None
                self._gallery[inp["image_id"]] = (boxes, scores, to_numpy(inst.pred_embeds), cells)

    def _gather(self) -> bool:
        """Merge all ranks' outputs into this process; False on non-main ranks."""
        if not self.distributed:
            return True
        comm.synchronize()
        parts = comm.gather((self._gallery, self._queries, self._pairs), dst=0)
        if not comm.is_main_process():
            return False
        self.reset()
        for gallery, queries, pairs in parts:
            self._gallery.update(gallery)
            self._queries.update(queries)
            self._pairs.update(pairs)
        return True

    def _warn_missing(self, what: str, missing: list, expected: int) -> None:
        warn_missing(self.dataset_name, what, missing, expected)

    def _agnostic_queries(self) -> List[QueryResult]:
        """Per-query rows with similarity = gallery embeddings . query embedding (or the local
        head's score, :func:`agnostic_similarity`)."""
        names = sorted(self._gallery)
        parts = [self._gallery[n] for n in names]
        counts = np.array([len(scores) for _, scores, _, _ in parts], dtype=np.int64)
        starts = dict(zip(names, (np.cumsum(counts) - counts).tolist()))
        count = dict(zip(names, counts.tolist()))
        boxes_scores = np.concatenate(
            [np.zeros((0, 5))] + [np.c_[boxes, scores] for boxes, scores, _, _ in parts]
        ).astype(np.float64)
        embeds = torch.from_numpy(np.concatenate([e for _, _, e, _ in parts])) if parts else None
        # cells when every image with a detection has them (images without one add none)
        with_boxes = [c for _, s, _, c in parts if len(s)]
        cells = (torch.from_numpy(np.concatenate(with_boxes))
                 if with_boxes and all(c is not None for c in with_boxes) else None)
        results = []
        for i in self.query_indices:
            gallery = {}
            present = [n for n in dict.fromkeys(self.protocol.gallery(i).images) if n in starts]
            if i in self._queries and present:
                # rows of this query's gallery images only, one block per image
                lengths = np.array([count[n] for n in present], dtype=np.int64)
                ends = np.cumsum(lengths)
                first = np.array([starts[n] for n in present], dtype=np.int64)
                idx = np.repeat(first - (ends - lengths), lengths) + np.arange(ends[-1])
                query = {k: torch.from_numpy(v) for k, v in self._queries[i].items()}
                t = torch.from_numpy(idx)
                sims = agnostic_similarity(query, embeds[t], None if cells is None else cells[t])
                sims = sims.numpy().astype(np.float64)
                rows = np.c_[boxes_scores[idx], sims]
                gallery = {n: rows[e - k : e] for n, k, e in zip(present, lengths, ends)}
            results.append(QueryResult(i, self.protocol.queries[i].image, gallery))
        self._warn_missing(
            "queries have no query embedding; they score 0",
            [i for i in self.query_indices if i not in self._queries],
            len(self.query_indices),
        )
        wanted = self.protocol.gallery_images(self.query_indices)
        self._warn_missing(
            "gallery images have no model output; counted as no detection",
            [n for n in wanted if n not in self._gallery],
            len(wanted),
        )
        return results

    def _pair_queries(self) -> List[QueryResult]:
        results, expected, missing = [], 0, []
        for i in self.query_indices:
            gallery = {}
            for n in dict.fromkeys(self.protocol.gallery(i).images):
                expected += 1
                rows = self._pairs.get((i, n))
                if rows is None:
                    missing.append((i, n))
                else:
                    gallery[n] = rows
            results.append(QueryResult(i, self.protocol.queries[i].image, gallery))
        self._warn_missing(
            "query-gallery pairs have no model output; counted as no detection", missing, expected
        )
        return results

    def _gallery_detections(self) -> Optional[Dict[str, np.ndarray]]:
        """image -> (N, 5) ``[x1, y1, x2, y2, score]`` of the gallery-image outputs, if any."""
        if not self._gallery:
            return None
        return {n: np.c_[b, s] for n, (b, s, _, _) in self._gallery.items()}

    def _evaluate_first_stage(self) -> None:
        """Cascade stage 1 (main process): first-stage rows, scores, detections and the
        shortlist go to the cascade state."""
        if self._pairs:
            raise ValueError(f"{self.dataset_name}: the cascade's first stage needs "
                             "query-agnostic outputs (gallery images, query boxes), got pairs")
        rows = {q.index: q.gallery for q in self._agnostic_queries()}
        galleries = {i: self.protocol.gallery(i).images for i in self.query_indices}
        shortlist = cascade.shortlist(galleries, rows, self.cascade.topk, self.det_thresh)
        scores = score_search(self.protocol, rows, self.det_thresh,
                              query_indices=self.query_indices)
        self.cascade.set_first_stage(rows, shortlist, self._gallery_detections(),
                                     100 * scores.mean_ap, 100 * scores.top_k(1))
        logger.info(
            "Cascade stage 1 on %s (query-agnostic, %d gallery images, %d query boxes%s): "
            "mAP %.2f  top-1 %.2f; re-scoring the top %d images per query: %d pairs",
            self.protocol.name, len(self._gallery), len(self._queries),
            ", ground-truth boxes" if self.use_gt_boxes else "",
            self.cascade.first_stage_map, self.cascade.first_stage_top1, self.cascade.topk,
            sum(len(v) for v in shortlist.values()),
        )

    def _cascade_queries(self) -> List[QueryResult]:
        """Per-query rows: pair rows of the shortlisted images, shifted first-stage rows else."""
        state, results, missing = self.cascade, [], []
        for i in self.query_indices:
            shortlisted = state.shortlist.get(i, [])
            missing += [(i, n) for n in shortlisted if (i, n) not in self._pairs]
            second = {n: self._pairs[(i, n)] for n in shortlisted if (i, n) in self._pairs}
            gallery = cascade.merge_cascade_rows(
                self.protocol.gallery(i).images, state.first_stage_rows.get(i, {}), second,
                shortlisted, self.det_thresh,
            )
            results.append(QueryResult(i, self.protocol.queries[i].image, gallery))
        self._warn_missing(
            "shortlisted query-gallery pairs have no model output; counted as no detection",
            missing, sum(len(v) for v in state.shortlist.values()),
        )
        return results

    def file_fields(self) -> Dict:
        """What identifies the last evaluation in the files: protocol, mode, cascade fields."""
        return {"protocol": self.protocol.name, "mode": self.mode, **self._cascade_fields(),
                "gt_boxes": self.use_gt_boxes}

    def _cascade_fields(self) -> Dict:
        if self.mode != cascade.CASCADE_MODE:
            return {}
        return {"cascade_topk": self.cascade.topk, "num_pairs": len(self._pairs)}

    def evaluate(self):
        if self.cascade is not None and self.cascade.stage == 1:
            if self._gather():
                self._evaluate_first_stage()
            return {}
        if not self._gather():
            return {}
        if self._pairs and self._queries:
            raise ValueError(
                f"{self.dataset_name}: outputs mix query-agnostic queries and query-gallery "
                "pairs; evaluate one kind of model at a time"
            )
        if self.cascade is not None:
            self.mode = cascade.CASCADE_MODE
            queries = self._cascade_queries()
            gallery_detections = self.cascade.gallery_detections
        else:
            self.mode = "pairs" if self._pairs else "agnostic"
            queries = self._pair_queries() if self.mode == "pairs" else self._agnostic_queries()
            gallery_detections = self._gallery_detections()
        if self.use_gt_boxes:
            gallery_detections = None  # the annotated boxes: detection metrics are meaningless
        cascade_fields = self._cascade_fields()
        if self.output_dir:
            path = os.path.join(self.output_dir, f"{self.file_prefix}_results.json.gz")
            write_results(
                path, self.protocol.dataset, queries, gallery_detections=gallery_detections,
                protocol=self.protocol.name, mode=self.mode, partial=self.partial,
                min_det_score=self.det_thresh, **cascade_fields,
                **({"gt_boxes": True} if self.use_gt_boxes else {}),
            )
            logger.info("Wrote person-search results to %s", path)

        scores = score_search(
            self.protocol, {q.index: q.gallery for q in queries}, self.det_thresh,
            query_indices=self.query_indices,
        )
        summary = scores.summary()
        search = OrderedDict(
            [("mAP", 100 * summary["mAP"])]
            + [(f"top{k}", 100 * summary[f"top{k}"]) for k in TOP_K]
            + [("num_queries", len(scores)), ("partial", self.partial)]
        )
        if cascade_fields:
            search.update(cascade_fields)
            search["first_stage_mAP"] = self.cascade.first_stage_map
            search["first_stage_top1"] = self.cascade.first_stage_top1
        label = queries_label(len(scores), len(self.protocol))
        mode_label = (
            f"cascade top-{self.cascade.topk}: {len(self._pairs)} pairs re-scored"
            if cascade_fields else self.mode
        )
        logger.info(
            "Person search on %s (%s, %s, %s): mAP %.2f  top-1 %.2f  top-5 %.2f  top-10 %.2f",
            self.protocol.name, mode_label, label,
            "with ground-truth boxes" if self.use_gt_boxes else f"det_thresh {self.det_thresh:g}",
            search["mAP"], search["top1"], search["top5"], search["top10"],
        )
        return OrderedDict([(self.task, search)])
