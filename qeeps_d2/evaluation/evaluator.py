"""``PersonSearchEvaluator``: Detectron2 evaluator for person search (mAP, top-k, detection).

It consumes the records of :func:`qeeps_d2.evaluation.search_inputs.build_search_records` and the
model's outputs, dispatching on the input keys:

* gallery image (no ``query_box``) -> ``{"instances": pred_boxes, scores, pred_embeds (N, D)}``;
* query (``query_box``, no ``query_file_name``) -> ``{"query_embed": (D,)}``;
* pair (``query_file_name``) -> ``{"instances": pred_boxes, scores, pred_sims (N,)}``.

Gallery and pair outputs may also carry ``proposal_boxes`` (R, 4) (and, for query-guided models,
``plain_proposal_boxes``, the stock RPN's alone): the evaluator then reports the detector recall
of the paper's Table 1: the fraction of (query, gallery entry) positives whose query-person box
is covered by a proposal with IoU >= 0.5 (``proposal_recall`` / ``plain_proposal_recall``).

Boxes are in original-image pixels. Only detections with ``score >= det_thresh`` are kept (they
are the only ones the protocol can rank), which bounds memory and the size of the results file;
the file records this threshold as ``"min_det_score"``.

``evaluate()`` gathers everything on the main process, builds each evaluated query's rows
``[x1, y1, x2, y2, score, similarity]`` per gallery image (agnostic models: similarity =
``pred_embeds @ query_embed``), writes ``<output_dir>/<dataset_name>_results.json.gz`` and scores
it with :mod:`qeeps_d2.evaluation.search_metrics`; the returned metrics also go to
``<output_dir>/<dataset_name>_metrics.json``. A gallery image (or pair) without output counts
as "no detection"; missing outputs are reported with a warning since they usually mean a bug.

Cascade (``cascade_topk`` K > 0, :mod:`qeeps_d2.evaluation.cascade`): the evaluator sees two
runs, driven by :func:`cascade_inference_on_dataset`. The first (query-agnostic records: gallery
images and query boxes) ends with the per-query shortlists, shared with every rank; the second
(the shortlisted pairs) ends with the merged rows, scored and written as mode ``"cascade"`` with
``cascade_topk`` (results file, metrics file, returned metrics and log lines). The first stage's
detections are written as ``gallery_detections`` and give the detection metrics.

Ground-truth boxes (``use_gt_boxes``, ``TEST.PERSON_SEARCH.USE_GT_BOXES``): gallery and pair
records carry ``given_boxes`` and the model's detections are exactly those boxes; every one is
kept with det_score 1 (the model's ClsNet score is ignored, so no threshold drops an annotated
box). This measures re-identification alone and is labelled everywhere: returned metrics under
``"person_search_gt_boxes"``, files ``<dataset_name>_gtboxes_results.json.gz`` (with
``"gt_boxes": true``) and ``<dataset_name>_gtboxes_metrics.json``, log lines "with ground-truth
boxes"; no detection metrics (they would be trivially perfect). Works in all three modes.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict, defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.search_protocol import SearchProtocol
from . import cascade
from .box_iou import box_iou
from .detection_metrics import detection_ground_truth, evaluate_detections
from .results_file import QueryResult, write_results
from .search_inputs import check_query_indices
from .search_metrics import TOP_K, score_search

__all__ = ["PersonSearchEvaluator", "cascade_inference_on_dataset"]

logger = logging.getLogger(__name__)

# output key of a proposal set -> name of its recall in the results
_RECALLS = {"proposal_boxes": "proposal_recall", "plain_proposal_boxes": "plain_proposal_recall"}
# metrics task name and file-name suffix of an evaluation with ground-truth boxes
GT_BOXES_TASK, GT_BOXES_SUFFIX = "person_search_gt_boxes", "_gtboxes"

def _to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


class PersonSearchEvaluator(DatasetEvaluator):
    """Scores person search on a :class:`SearchProtocol` (see the module docstring).

    Returns ``{"person_search": {"mAP", "top1", "top5", "top10" (percent), "num_queries",
    "partial" (bool)}}``, plus ``{"detection": {"AP", "recall", "labeled_recall"}}`` (percent)
    when gallery-image outputs exist (query-agnostic models). With ``use_gt_boxes`` the search
    metrics are under ``"person_search_gt_boxes"`` and there are no detection metrics.
    """

    def __init__(
        self,
        dataset_name: str,
        protocol: SearchProtocol,
        output_dir: Optional[str] = None,
        det_thresh: float = 0.5,
        query_indices: Optional[Sequence[int]] = None,
        distributed: bool = True,
        cascade_topk: int = 0,
        use_gt_boxes: bool = False,
    ):
        """
        Args:
            dataset_name: registered test set (names the results file; its dataset dicts give
                the detection ground truth).
            protocol: the search protocol to score.
            output_dir: folder of the results file; None writes no file.
            det_thresh: detection-score threshold of the protocol.
            query_indices: evaluate only these queries (partial evaluation); None = all.
            distributed: gather the outputs of all ranks and score on the main process.
            cascade_topk: K > 0: cascade evaluation with K re-scored gallery images per query
                (see the module docstring); 0: one run, exhaustive.
            use_gt_boxes: the records carry the gallery images' annotated boxes
                (``given_boxes``): keep every detection with det_score 1 and label the results
                (see the module docstring).
        """
        self._dataset_name = dataset_name
        self._protocol = protocol
        self._output_dir = output_dir
        self._det_thresh = float(det_thresh)
        self._query_indices = check_query_indices(protocol, query_indices)
        self._partial = len(self._query_indices) < len(protocol)
        self._distributed = distributed
        self._positives_by_image = None
        if cascade_topk < 0:
            raise ValueError(f"cascade_topk must be >= 0, got {cascade_topk}")
        self._cascade_topk = int(cascade_topk)
        self._use_gt_boxes = bool(use_gt_boxes)
        self._file_prefix = dataset_name + (GT_BOXES_SUFFIX if use_gt_boxes else "")
        self.reset_cascade()
        self.reset()

    def reset_cascade(self) -> None:
        """Forget the cascade's first stage: the next run is a first stage again."""
        # main process: query index -> image -> first-stage rows, gallery detections, proposal
        # recall hits, first-stage scores; every rank: the shortlist (query index -> images)
        self._first_stage: Optional[Dict] = None

    @property
    def shortlist(self) -> Dict[int, List[str]]:
        """Cascade: query index -> the gallery images to re-score (after the first run)."""
        if self._first_stage is None:
            raise RuntimeError("the cascade's first stage has not been evaluated yet")
        return self._first_stage["shortlist"]

    def reset(self):
        # image_id -> (boxes (N,4), scores (N,), embeds (N,D)); query index -> (D,);
        # (query index, image_id) -> (N, 6) rows.
        self._gallery: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._query_embeds: Dict[int, np.ndarray] = {}
        self._pairs: Dict[Tuple[int, str], np.ndarray] = {}
        # proposal key -> {(query index, gallery entry index): covered by a proposal}
        self._recall_hits: Dict[str, Dict[Tuple[int, int], bool]] = {k: {} for k in _RECALLS}

    def _positives(self):
        """image -> [(query index, gallery entry index, gt box)] over the evaluated queries."""
        if self._positives_by_image is None:
            positives = defaultdict(list)
            for i in self._query_indices:
                gallery = self._protocol.gallery(i)
                for k in np.flatnonzero(gallery.positive):
                    positives[gallery.images[k]].append((i, int(k), gallery.gt_boxes[k]))
            self._positives_by_image = positives
        return self._positives_by_image

    def _record_recall(self, image_id: str, output, query_index: Optional[int] = None) -> None:
        """Which positives of this image (of this query, for a pair) a proposal covers."""
        entries = [e for e in self._positives().get(image_id, ())
                   if query_index is None or e[0] == query_index]
        if not entries:
            return
        gts = np.stack([e[2] for e in entries])
        for key, hits in self._recall_hits.items():
            if key in output:
                props = _to_numpy(output[key]).astype(np.float64).reshape(-1, 4)
                covered = (box_iou(gts[:, None], props[None]) >= 0.5).any(axis=1)
                hits.update(((i, k), bool(c)) for (i, k, _), c in zip(entries, covered))

    def _kept(self, inp, instances):
        """(boxes (N, 4), det scores (N,), instances) of the detections the protocol can rank:
        score >= det_thresh, or with given boxes every box, det score 1."""
        if ("given_boxes" in inp) != self._use_gt_boxes:
            raise ValueError(
                f"{self._dataset_name}: record {inp.get('image_id')!r} "
                f"{'has' if 'given_boxes' in inp else 'lacks'} given boxes, but the evaluator "
                f"was built with use_gt_boxes={self._use_gt_boxes}"
            )
        if self._use_gt_boxes:
            instances = instances.to("cpu")
            scores = np.ones(len(instances), dtype=np.float32)
            return _to_numpy(instances.pred_boxes.tensor), scores, instances
        instances = instances[instances.scores >= self._det_thresh].to("cpu")
        return _to_numpy(instances.pred_boxes.tensor), _to_numpy(instances.scores), instances

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "query_file_name" in inp:
                boxes, scores, inst = self._kept(inp, out["instances"])
                rows = np.c_[boxes, scores, _to_numpy(inst.pred_sims)].astype(np.float64)
                self._pairs[(int(inp["query_index"]), inp["image_id"])] = rows.reshape(-1, 6)
                self._record_recall(inp["image_id"], out, int(inp["query_index"]))
            elif "query_box" in inp:
                self._query_embeds[int(inp["query_index"])] = _to_numpy(out["query_embed"])
            else:
                boxes, scores, inst = self._kept(inp, out["instances"])
                self._gallery[inp["image_id"]] = (boxes, scores, _to_numpy(inst.pred_embeds))
                self._record_recall(inp["image_id"], out)

    def _gather(self) -> bool:
        """Merge all ranks' outputs into this process; False on non-main ranks."""
        if not self._distributed:
            return True
        comm.synchronize()
        parts = comm.gather(
            (self._gallery, self._query_embeds, self._pairs, self._recall_hits), dst=0
        )
        if not comm.is_main_process():
            return False
        self.reset()
        for gallery, queries, pairs, recall_hits in parts:
            self._gallery.update(gallery)
            self._query_embeds.update(queries)
            self._pairs.update(pairs)
            for key, hits in recall_hits.items():
                self._recall_hits[key].update(hits)
        return True

    def _agnostic_queries(self) -> List[QueryResult]:
        """Per-query rows with similarity = gallery embeddings . query embedding."""
        names = sorted(self._gallery)
        parts = [self._gallery[n] for n in names]
        counts = np.array([len(scores) for _, scores, _ in parts], dtype=np.int64)
        starts = dict(zip(names, (np.cumsum(counts) - counts).tolist()))
        count = dict(zip(names, counts.tolist()))
        boxes_scores = np.concatenate(
            [np.zeros((0, 5))] + [np.c_[boxes, scores] for boxes, scores, _ in parts]
        ).astype(np.float64)
        embeds = np.concatenate([e for _, _, e in parts]) if parts else None
        results = []
        for i in self._query_indices:
            gallery = {}
            present = [n for n in dict.fromkeys(self._protocol.gallery(i).images) if n in starts]
            if i in self._query_embeds and present:
                # rows of this query's gallery images only, one block per image
                lengths = np.array([count[n] for n in present], dtype=np.int64)
                ends = np.cumsum(lengths)
                first = np.array([starts[n] for n in present], dtype=np.int64)
                idx = np.repeat(first - (ends - lengths), lengths) + np.arange(ends[-1])
                sims = (embeds[idx] @ self._query_embeds[i]).astype(np.float64)
                rows = np.c_[boxes_scores[idx], sims]
                gallery = {n: rows[e - k : e] for n, k, e in zip(present, lengths, ends)}
            results.append(QueryResult(i, self._protocol.queries[i].image, gallery))
        self._warn_missing(
            "queries have no query embedding; they score 0",
            [i for i in self._query_indices if i not in self._query_embeds],
            len(self._query_indices),
        )
        wanted = self._protocol.gallery_images(self._query_indices)
        self._warn_missing(
            "gallery images have no model output; counted as no detection",
            [n for n in wanted if n not in self._gallery],
            len(wanted),
        )
        return results

    def _pair_queries(self) -> List[QueryResult]:
        results, expected, missing = [], 0, []
        for i in self._query_indices:
            gallery = {}
            for n in dict.fromkeys(self._protocol.gallery(i).images):
                expected += 1
                rows = self._pairs.get((i, n))
                if rows is None:
                    missing.append((i, n))
                else:
                    gallery[n] = rows
            results.append(QueryResult(i, self._protocol.queries[i].image, gallery))
        self._warn_missing(
            "query-gallery pairs have no model output; counted as no detection", missing, expected
        )
        return results

    def _warn_missing(self, what: str, missing: list, expected: int) -> None:
        """Warn that ``len(missing)`` of ``expected`` items are missing (louder above 10%)."""
        if missing:
            logger.warning(
                "%s: %d of %d %s (e.g. %s)%s",
                self._dataset_name, len(missing), expected, what, missing[0],
                " -- MANY are missing: the data loader or the model is likely wrong"
                if len(missing) > 0.1 * expected else "",
            )

    def _detection_scores(self, gallery_detections: Dict[str, np.ndarray]) -> Dict[str, float]:
        """Detection AP / recall over the evaluated gallery images (ground truth: dataset dicts)."""
        wanted = set(self._protocol.gallery_images(self._query_indices))
        ground_truth = detection_ground_truth(DatasetCatalog.get(self._dataset_name), wanted)
        self._warn_missing(
            "gallery images are not in the data set's dicts; left out of the detection metrics",
            sorted(wanted - set(ground_truth)), len(wanted),
        )
        detections = {n: d for n, d in gallery_detections.items() if n in ground_truth}
        return evaluate_detections(ground_truth, detections, self._det_thresh)

    def _evaluate_first_stage(self):
        """Cascade stage 1: first-stage rows and scores (main), the shortlist (every rank)."""
        main = self._gather()
        shortlist = None
        if main:
            if self._pairs:
                raise ValueError(f"{self._dataset_name}: the cascade's first stage needs "
                                 "query-agnostic outputs (gallery images, query boxes), got pairs")
            rows = {q.index: q.gallery for q in self._agnostic_queries()}
            galleries = {i: self._protocol.gallery(i).images for i in self._query_indices}
            shortlist = cascade.shortlist(galleries, rows, self._cascade_topk, self._det_thresh)
            scores = score_search(self._protocol, rows, self._det_thresh,
                                  query_indices=self._query_indices)
            self._first_stage = {
                "rows": rows,
                "gallery_detections": {n: np.c_[b, s] for n, (b, s, _) in self._gallery.items()},
                "recall_hits": dict(self._recall_hits["proposal_boxes"]),
                "mAP": 100 * scores.mean_ap,
                "top1": 100 * scores.top_k(1),
            }
            logger.info(
                "Cascade stage 1 on %s (query-agnostic, %d gallery images, %d query boxes%s): "
                "mAP %.2f  top-1 %.2f; re-scoring the top %d images per query: %d pairs",
                self._protocol.name, len(self._gallery), len(self._query_embeds),
                ", ground-truth boxes" if self._use_gt_boxes else "",
                self._first_stage["mAP"], self._first_stage["top1"], self._cascade_topk,
                sum(len(v) for v in shortlist.values()),
            )
        if self._distributed and comm.get_world_size() > 1:
            shortlist = comm.all_gather(shortlist)[0]  # the main process's
        self._first_stage = {**(self._first_stage or {}), "shortlist": shortlist}
        return {}

    def _cascade_queries(self) -> List[QueryResult]:
        """Per-query rows: pair rows of the shortlisted images, shifted first-stage rows else."""
        first, results, missing = self._first_stage, [], []
        for i in self._query_indices:
            shortlisted = first["shortlist"].get(i, [])
            missing += [(i, n) for n in shortlisted if (i, n) not in self._pairs]
            second = {n: self._pairs[(i, n)] for n in shortlisted if (i, n) in self._pairs}
            gallery = cascade.merge_cascade_rows(
                self._protocol.gallery(i).images, first["rows"].get(i, {}), second, shortlisted,
                self._det_thresh,
            )
            results.append(QueryResult(i, self._protocol.queries[i].image, gallery))
        self._warn_missing(
            "shortlisted query-gallery pairs have no model output; counted as no detection",
            missing, sum(len(v) for v in first["shortlist"].values()),
        )
        return results

    def evaluate(self):
        if self._cascade_topk and self._first_stage is None:
            return self._evaluate_first_stage()
        if not self._gather():
            return {}
        if self._pairs and self._query_embeds:
            raise ValueError(
                f"{self._dataset_name}: outputs mix query-agnostic queries and query-gallery "
                "pairs; evaluate one kind of model at a time"
            )
        if self._cascade_topk:
            mode = cascade.CASCADE_MODE
            queries = self._cascade_queries()
            gallery_detections = self._first_stage["gallery_detections"]
            # proposal recall: the pair pass's where a pair ran, the first stage's elsewhere
            self._recall_hits = {
                "proposal_boxes": {**self._first_stage["recall_hits"],
                                   **self._recall_hits["proposal_boxes"]},
                "plain_proposal_boxes": {},
            }
        else:
            mode = "pairs" if self._pairs else "agnostic"
            queries = self._pair_queries() if mode == "pairs" else self._agnostic_queries()
            gallery_detections = (
                {n: np.c_[b, s] for n, (b, s, _) in self._gallery.items()}
                if self._gallery else None
            )
        if self._use_gt_boxes:
            gallery_detections = None  # the annotated boxes: detection metrics are meaningless
        cascade_fields = (
            {"cascade_topk": self._cascade_topk, "num_pairs": len(self._pairs)}
            if mode == cascade.CASCADE_MODE else {}
        )
        if self._output_dir:
            path = os.path.join(self._output_dir, f"{self._file_prefix}_results.json.gz")
            write_results(
                path, self._protocol.dataset, queries, gallery_detections=gallery_detections,
                protocol=self._protocol.name, mode=mode, partial=self._partial,
                min_det_score=self._det_thresh, **cascade_fields,
                **({"gt_boxes": True} if self._use_gt_boxes else {}),
            )
            logger.info("Wrote person-search results to %s", path)

        scores = score_search(
            self._protocol, {q.index: q.gallery for q in queries}, self._det_thresh,
            query_indices=self._query_indices,
        )
        summary = scores.summary()
        search = OrderedDict(
            [("mAP", 100 * summary["mAP"])]
            + [(f"top{k}", 100 * summary[f"top{k}"]) for k in TOP_K]
            + [("num_queries", len(scores)), ("partial", self._partial)]
        )
        if cascade_fields:
            search.update(cascade_fields)
            search["first_stage_mAP"] = self._first_stage["mAP"]
            search["first_stage_top1"] = self._first_stage["top1"]
        num_positives = sum(len(v) for v in self._positives().values())
        for key, name in _RECALLS.items():
            if self._recall_hits[key] and num_positives:
                search[name] = 100 * sum(self._recall_hits[key].values()) / num_positives
        label = (
            f"partial: {len(scores)} of {len(self._protocol)} queries"
            if self._partial else f"{len(scores)} queries"
        )
        mode_label = (
            f"cascade top-{self._cascade_topk}: {len(self._pairs)} pairs re-scored"
            if cascade_fields else mode
        )
        logger.info(
            "Person search on %s (%s, %s, %s): mAP %.2f  top-1 %.2f  top-5 %.2f  top-10 %.2f",
            self._protocol.name, mode_label, label,
            "with ground-truth boxes" if self._use_gt_boxes else f"det_thresh {self._det_thresh:g}",
            search["mAP"], search["top1"], search["top5"], search["top10"],
        )
        recalls = [f"{name.replace('_', ' ')} {search[name]:.2f}" for name in _RECALLS.values()
                   if name in search]
        if recalls:
            logger.info("Detector recall on %s (IoU 0.5, %s): %s", self._protocol.name, label,
                        "  ".join(recalls))
        results = OrderedDict([(GT_BOXES_TASK if self._use_gt_boxes else "person_search", search)])
        if gallery_detections is not None:
            det = self._detection_scores(gallery_detections)
            results["detection"] = OrderedDict(
                AP=100 * det["ap"], recall=100 * det["recall"],
                labeled_recall=100 * det["labeled_recall"], partial=self._partial,
            )
            logger.info(
                "Detection on %s (%s): AP %.2f  recall %.2f  labeled recall %.2f",
                self._dataset_name, label + (", first stage" if cascade_fields else ""),
                results["detection"]["AP"],
                results["detection"]["recall"], results["detection"]["labeled_recall"],
            )
        if self._output_dir:
            path = os.path.join(self._output_dir, f"{self._file_prefix}_metrics.json")
            with open(path, "w") as f:
                json.dump({"protocol": self._protocol.name, "mode": mode, **cascade_fields,
                           "gt_boxes": self._use_gt_boxes, **results}, f, indent=1)
        return results


def cascade_inference_on_dataset(
    model,
    first_stage_loader: Iterable,
    pair_loader_for: Callable[[Dict[int, List[str]]], Iterable],
    evaluator: PersonSearchEvaluator,
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
        evaluator: a :class:`PersonSearchEvaluator` with ``cascade_topk`` > 0.

    Returns:
        the evaluator's cascade metrics on the main process, ``{}`` on the others.
    """
    from detectron2.evaluation import inference_on_dataset

    if not evaluator._cascade_topk:
        raise ValueError("cascade_inference_on_dataset needs an evaluator with cascade_topk > 0")
    evaluator.reset_cascade()
    inference_on_dataset(model, first_stage_loader, evaluator)
    return inference_on_dataset(model, pair_loader_for(evaluator.shortlist), evaluator)
