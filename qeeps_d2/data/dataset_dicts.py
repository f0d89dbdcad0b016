"""Detectron2-format dataset dicts for person search, built from validated boxes (numpy only).

Every loader (CUHK-SYSU, PRW, SynthPS) produces one dict per image::

    {"file_name": abs path, "image_id": base name ("s1.jpg"), "height": H, "width": W,
     "annotations": [{"bbox": [x1, y1, x2, y2] (floats), "bbox_mode": 0 (BoxMode.XYXY_ABS),
                      "category_id": 0, "person_id": pid (>= 0 labeled, -1 unlabeled)}, ...],
     ...extra keys (PRW: "camera_id")}

Boxes are checked against the image: a zero-size box or one that does not overlap the image at all
is an error naming the file and the box; a box that only extends past the border is kept as the
reference loaders keep it (Detectron2 clips it when mapping) and counted.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

__all__ = ["XYXY_ABS", "UNLABELED", "make_image_dict", "count_past_border"]

XYXY_ABS = 0  # detectron2.structures.BoxMode.XYXY_ABS, without importing detectron2
UNLABELED = -1  # person_id of a person without identity


def make_image_dict(file_name: str, height: int, width: int, boxes: np.ndarray,
                    person_ids: np.ndarray, **extra) -> Dict:
    """Build one image's dataset dict.

    Args:
        file_name: absolute path of the image; ``image_id`` is its base name.
        height, width: image size in pixels.
        boxes: (n, 4) XYXY absolute pixels.
        person_ids: (n,) ints, -1 for unlabeled persons.
        extra: additional per-image keys.
    Returns:
        the dict. Boxes extending past the border are kept (see :func:`count_past_border`).
    Raises:
        ValueError: a box has zero or negative size or lies entirely outside the image.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    person_ids = np.asarray(person_ids).reshape(-1)
    if len(person_ids) != len(boxes):
        raise ValueError(f"{file_name}: {len(boxes)} boxes but {len(person_ids)} person ids")
    x1, y1, x2, y2 = boxes.T
    bad = (x2 <= x1) | (y2 <= y1)
    if bad.any():
        raise ValueError(f"{file_name}: zero-size box {boxes[np.argmax(bad)].tolist()} (XYXY)")
    outside = (x1 >= width) | (y1 >= height) | (x2 <= 0) | (y2 <= 0)
    if outside.any():
        raise ValueError(f"{file_name}: box {boxes[np.argmax(outside)].tolist()} (XYXY) lies "
                         f"outside the {width}x{height} image")
    annotations: List[Dict] = [
        {"bbox": box, "bbox_mode": XYXY_ABS, "category_id": 0, "person_id": int(pid)}
        for box, pid in zip(boxes.tolist(), person_ids.tolist())
    ]
    return {"file_name": file_name, "image_id": os.path.basename(file_name),
            "height": int(height), "width": int(width), "annotations": annotations, **extra}


def count_past_border(boxes: np.ndarray, height: int, width: int) -> int:
    """Number of (n, 4) XYXY boxes that extend beyond the image border."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return int(((boxes[:, :2] < 0).any(1) | (boxes[:, 2] > width) | (boxes[:, 3] > height)).sum())
