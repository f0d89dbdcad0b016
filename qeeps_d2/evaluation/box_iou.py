"""IoU of XYXY boxes in continuous coordinates, as the person-search references compute it."""
from __future__ import annotations

import numpy as np

__all__ = ["box_iou"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` (..., 4) and ``b`` (..., 4), XYXY, broadcast over the leading axes.

    ``inter = max(0, x2 - x1) * max(0, y2 - y1)`` and ``union = area_a + area_b - inter`` (no +1).
    Paired rows: ``box_iou(a, b)`` with (N, 4) and (N, 4) gives (N,); all pairs:
    ``box_iou(a[:, None], b[None])`` gives (M, N).
    """
    lo = np.maximum(a[..., :2], b[..., :2])
    hi = np.minimum(a[..., 2:], b[..., 2:])
    wh = np.clip(hi - lo, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter)
