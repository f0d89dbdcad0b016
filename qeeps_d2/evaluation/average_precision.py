"""Average precision with scikit-learn's ``average_precision_score`` semantics (numpy only).

The person-search references score every query with ``sklearn.metrics.average_precision_score``
(binary case, no sample weights). This module reproduces it bit for bit without depending on
scikit-learn at run time:

* scores are sorted in descending order and **tied scores form one threshold**: all items sharing
  a score enter the precision-recall curve together, so the order of tied items never changes AP;
* AP = sum over distinct thresholds t (highest first) of (R_t - R_{t-1}) * P_t, the
  un-interpolated step integral, with R_0 = 0;
* the arithmetic follows scikit-learn's operation order (float64 cumulative sums, reversed curve,
  ``-sum(diff(recall) * precision[:-1])`` clipped at 0) so that results agree to the last digit.

With no positive item the score is defined here as 0.0 (scikit-learn warns and returns a
meaningless value; the search protocol already sets AP = 0 when nothing is found).
"""
from __future__ import annotations

import numpy as np

__all__ = ["average_precision", "average_precision_sorted"]


def average_precision_sorted(y_true_sorted: np.ndarray, y_score_sorted: np.ndarray) -> float:
    """AP of items already sorted by descending score.

    Args:
        y_true_sorted: (N,) bool or {0, 1} labels, in descending score order.
        y_score_sorted: (N,) float scores, non-increasing. Tied scores may be in any order.

    Returns:
        The average precision in [0, 1]; 0.0 when there is no positive (or no item).
    """
    y_true_sorted = np.asarray(y_true_sorted, dtype=np.float64)
    y_score_sorted = np.asarray(y_score_sorted, dtype=np.float64)
    if y_true_sorted.size == 0:
        return 0.0
    # Last index of every run of equal scores: one precision-recall point per distinct score.
    last_of_run = np.r_[np.flatnonzero(np.diff(y_score_sorted)), y_score_sorted.size - 1]
    tps = np.cumsum(y_true_sorted)[last_of_run]
    if tps[-1] == 0:
        return 0.0
    fps = 1 + last_of_run.astype(np.float64) - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    precision = np.r_[precision[::-1], 1.0]
    recall = np.r_[recall[::-1], 0.0]
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """``sklearn.metrics.average_precision_score(y_true, y_score)`` for binary labels.

    Args:
        y_true: (N,) bool or {0, 1} labels.
        y_score: (N,) finite float scores (higher = more confident).

    Returns:
        The average precision in [0, 1]; 0.0 when there is no positive (or no item).
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape != y_score.shape or y_true.ndim != 1:
        raise ValueError(
            f"y_true and y_score must be 1-d arrays of the same length, got shapes "
            f"{y_true.shape} and {y_score.shape}"
        )
    order = np.argsort(-y_score, kind="stable")
    return average_precision_sorted(y_true[order], y_score[order])
