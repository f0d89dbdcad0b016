"""Detectron2-format dataset dicts for person search, built from validated boxes (numpy only).

Every loader (CUHK-SYSU, PRW, SynthPS) produces one dict per image::

    {"file_name": abs path, "image_id": base name ("s1.jpg"), "height": H, "width": W,
     "annotations": [{"bbox": [x1, y1, x2, y2] (floats), "bbox_mode": 0 (BoxMode.XYXY_ABS),
                      "category_id": 0, "person_id": pid (>= 0 labeled, -1 unlabeled)}, ...],
     ...extra keys (PRW: "camera_id")}

Boxes are checked against their image: a zero-size box or one that does not overlap the image at
all is an error naming the file and the box; a box that only extends past the border is kept as
the reference loaders keep it (Detectron2 clips it when mapping) and counted.
"""
from __future__ import annotations

import os
from typing import Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["XYXY_ABS", "XYWH_ABS", "UNLABELED", "make_image_dicts", "detection_ground_truth"]

XYXY_ABS = 0  # detectron2.structures.BoxMode.XYXY_ABS, without importing detectron2
XYWH_ABS = 1  # BoxMode.XYWH_ABS
UNLABELED = -1  # person_id of a person without identity


def make_image_dicts(file_names: Sequence[str], sizes: np.ndarray, counts: np.ndarray,
                     boxes: np.ndarray, person_ids: np.ndarray,
                     extra: Optional[Dict[str, Sequence]] = None) -> Tuple[List[Dict], int]:
    """Build the dataset dicts of N images holding M boxes in total.

    Args:
        file_names: N absolute image paths; ``image_id`` is the base name.
        sizes: (N, 2) ``(height, width)``.
        counts: (N,) number of boxes of each image; the boxes are consecutive in ``boxes``.
        boxes: (M, 4) XYXY absolute pixels.
        person_ids: (M,) ints, -1 for unlabeled persons.
        extra: per-image keys, ``key -> N values`` (e.g. ``{"camera_id": [...]}``).
    Returns:
        the N dicts and the number of boxes that extend past their image border (kept).
    Raises:
        ValueError: a box has zero or negative size or lies entirely outside its image.
    """
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    counts = np.asarray(counts, np.int64).reshape(-1)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    person_ids = np.asarray(person_ids, np.int64).reshape(-1)
    if not len(file_names) == len(sizes) == len(counts) or counts.sum() != len(boxes) \
            or len(person_ids) != len(boxes):
        raise ValueError(f"inconsistent lengths: {len(file_names)} files, {len(sizes)} sizes, "
                         f"{len(counts)} counts summing to {counts.sum()}, {len(boxes)} boxes, "
                         f"{len(person_ids)} person ids")
    owner = np.repeat(np.arange(len(counts)), counts)
    height, width = sizes[owner, 0], sizes[owner, 1]
    x1, y1, x2, y2 = boxes.T
    for bad, what in (((x2 <= x1) | (y2 <= y1), "is a zero-size box"),
                      ((x1 >= width) | (y1 >= height) | (x2 <= 0) | (y2 <= 0),
                       "lies outside the image")):
        if bad.any():
            k = int(np.argmax(bad))
            h, w = sizes[owner[k]]
            raise ValueError(f"{file_names[owner[k]]}: box {boxes[k].tolist()} (XYXY) {what} "
                             f"({w}x{h})")
    past_border = int(((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height)).sum())

    box_list, pid_list = boxes.tolist(), person_ids.tolist()
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    extra = extra or {}
    dicts = []
    for i, (file_name, (h, w)) in enumerate(zip(file_names, sizes.tolist())):
        annotations = [{"bbox": box_list[k], "bbox_mode": XYXY_ABS, "category_id": 0,
                        "person_id": pid_list[k]} for k in range(starts[i], starts[i + 1])]
        dicts.append({"file_name": file_name, "image_id": os.path.basename(file_name),
                      "height": h, "width": w, "annotations": annotations,
                      **{key: values[i] for key, values in extra.items()}})
    return dicts, past_border


def detection_ground_truth(
    dataset_dicts: Iterable[Mapping], images: Collection[str]
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Person boxes and ids of some images, from Detectron2 dataset dicts.

    Args:
        dataset_dicts: dicts with ``image_id`` (image base name) and ``annotations``
            (``bbox``, ``bbox_mode`` XYXY_ABS or XYWH_ABS, ``person_id``, -1 unlabeled).
        images: the image names wanted; others are skipped.

    Returns:
        image name -> ((M, 4) XYXY float64 boxes, (M,) int64 person ids), for the wanted images
        found in ``dataset_dicts``.
    """
    ground_truth = {}
    for d in dataset_dicts:
        name = d["image_id"]
        if name not in images:
            continue
        boxes, pids = [], []
        for a in d.get("annotations", []):
            box = np.asarray(a["bbox"], dtype=np.float64)
            if int(a["bbox_mode"]) == XYWH_ABS:
                box = np.r_[box[:2], box[:2] + box[2:]]
            elif int(a["bbox_mode"]) != XYXY_ABS:
                raise ValueError(
                    f"{name}: unsupported bbox_mode {a['bbox_mode']!r} (XYXY_ABS or XYWH_ABS)"
                )
            boxes.append(box)
            pids.append(int(a.get("person_id", -1)))
        ground_truth[name] = (np.asarray(boxes).reshape(-1, 4), np.asarray(pids, dtype=np.int64))
    return ground_truth
