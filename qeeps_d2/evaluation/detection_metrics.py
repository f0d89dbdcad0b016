"""Detection AP and recall at IoU 0.5 over gallery images (numpy only).

Follows OIM's ``psdb.py:evaluate_detections`` (datasets-and-protocols.md 3.3). Per image:

1. detections with ``score >= det_thresh`` are kept;
2. ``tf = IoU(gt, det) >= 0.5`` (continuous coordinates);
3. every detection keeps only its highest-IoU ground truth, then every ground truth keeps only
   its highest-IoU detection (argmax on the raw IoU matrix, first index on ties);
4. a detection whose column still holds a True is a true positive; ``count_tp += tf.sum()``,
   ``count_gt += #gt`` (images without detections included).

``recall = count_tp / count_gt`` and ``ap = average_precision(labels, scores) * recall``.
The labeled-only variant keeps ground truth with ``person_id >= 0`` (psdb.py's ``> 0`` also drops
pid 0, a bug not reproduced), skips images left without ground truth, and reports recall only,
as the reference does.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import numpy as np

from .average_precision import average_precision
from .box_iou import box_iou

__all__ = ["evaluate_detections"]

def _match_image(gt: np.ndarray, det: np.ndarray, iou_thresh: float) -> np.ndarray:
    """(N,) bool: which of the N detections are true positives against the (M, 4) ground truth."""
    if len(gt) == 0 or len(det) == 0:
        return np.zeros(len(det), dtype=bool)
    iou = box_iou(gt[:, None], det[None, :, :4])
    tf = iou >= iou_thresh
    best_gt = np.zeros_like(tf)
    best_gt[iou.argmax(axis=0), np.arange(iou.shape[1])] = True
    best_det = np.zeros_like(tf)
    best_det[np.arange(iou.shape[0]), iou.argmax(axis=1)] = True
    return (tf & best_gt & best_det).any(axis=0)


def _accumulate(
    ground_truth: Mapping[str, np.ndarray],
    detections: Mapping[str, np.ndarray],
    det_thresh: float,
    iou_thresh: float,
) -> Tuple[np.ndarray, np.ndarray, int, int]:
    """Labels and scores of all kept detections, count_tp and count_gt over the given images."""
    labels, scores, count_tp, count_gt = [], [], 0, 0
    for name, gt in ground_truth.items():
        det = detections.get(name, np.zeros((0, 5)))
        det = det[det[:, 4] >= det_thresh]
        tp = _match_image(gt, det, iou_thresh)
        labels.append(tp)
        scores.append(det[:, 4])
        count_tp += int(tp.sum())
        count_gt += len(gt)
    if not labels:
        return np.zeros(0, bool), np.zeros(0), 0, 0
    return np.concatenate(labels), np.concatenate(scores), count_tp, count_gt


def evaluate_detections(
    ground_truth: Mapping[str, Tuple[np.ndarray, np.ndarray]],
    detections: Mapping[str, np.ndarray],
    det_thresh: float = 0.5,
    iou_thresh: float = 0.5,
) -> Dict[str, float]:
    """Detection AP / recall over the images of ``ground_truth``.

    Args:
        ground_truth: image name -> ((M, 4) XYXY person boxes, (M,) int person ids, -1 unlabeled).
            These are the images evaluated; an image without detections counts its people.
        detections: image name -> (N, >=5) rows ``[x1, y1, x2, y2, score, ...]``; missing images
            had no detection. Every name must be in ``ground_truth``.
        det_thresh: detections with ``score >= det_thresh`` are evaluated.
        iou_thresh: IoU for a match (0.5 in every reference).

    Returns:
        ``{"ap", "recall", "labeled_recall"}`` as fractions in [0, 1] (0 when there is no
        ground truth).
    """
    unknown = sorted(set(detections) - set(ground_truth))
    if unknown:
        raise ValueError(
            f"detections for {len(unknown)} image(s) without ground truth, e.g. {unknown[0]!r}"
        )
    boxes = {name: np.asarray(b, np.float64).reshape(-1, 4) 
             for name, (b, _) in ground_truth.items()}
    labeled = {}
    for name, (b, pids) in ground_truth.items():
        keep = np.asarray(pids) >= 0
        if keep.any():
            labeled[name] = boxes[name][keep]

    labels, scores, count_tp, count_gt = _accumulate(boxes, detections, det_thresh, iou_thresh)
    recall = count_tp / count_gt if count_gt else 0.0
    ap = average_precision(labels, scores) * recall if count_tp else 0.0
    _, _, labeled_tp, labeled_gt = _accumulate(labeled, detections, det_thresh, iou_thresh)
    return {
        "ap": ap,
        "recall": recall,
        "labeled_recall": labeled_tp / labeled_gt if labeled_gt else 0.0,
    }
