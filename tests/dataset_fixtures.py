"""Tiny CUHK-SYSU and PRW data sets in the official on-disk formats, with their expected content.

Shared by the data-layer tests and the evaluation CLI tests. Each ``make_*_fixture(root)`` writes
the data set INTO ``root`` (the data set folder itself, e.g. ``<datasets>/CUHK-SYSU`` or
``<datasets>/PRW``) and returns a dict of what a correct loader must read back. Boxes in the
expectations are XYXY lists of floats; ``None`` marks a gallery entry without the query person.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import scipy.io

from qeeps_d2.data.datasets.cuhk_sysu import write_cuhk_sysu

__all__ = ["make_cuhk_sysu_fixture", "make_prw_fixture"]


def _write_jpeg(path: str, height: int, width: int, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if not cv2.imwrite(path, pixels):
        raise OSError(f"could not write {path}")


def _xyxy(x, y, w, h):
    return [float(x), float(y), float(x + w), float(y + h)]


# ------------------------------------------------------------------------------------------------
# CUHK-SYSU
# ------------------------------------------------------------------------------------------------

# Images.mat, in file order (train and test images interleaved): name -> boxes [x, y, w, h].
_CUHK_IMAGES = {
    "s1.jpg": [[10, 10, 20, 40], [40, 5, 0, 30], [50, 20, 15, 35]],  # w = 0: dropped
    "s5.jpg": [[10, 10, 20, 50], [50, 10, 20, 50]],
    "s2.jpg": [[5, 5, 30, 60], [60, 10, 25, 50]],
    "s6.jpg": [[5, 5, 25, 60], [60, 10, 20, 50]],
    # x + w = 65620 overflows uint16 (to 84) unless cast first; the box extends past the border.
    "s3.jpg": [[0, 0, 20, 50], [90, 30, 65530, 40]],
    "s7.jpg": [[20, 20, 20, 40], [70, 20, 20, 40]],
    "s4.jpg": [[30, 20, 20, 40], [1, 1, 5, 0]],  # h = 0: dropped
    "s8.jpg": [[10, 10, 20, 50], [40, 10, 20, 50]],  # the same test id twice
    "s9.jpg": [[30, 30, 20, 40]],
    "s10.jpg": [[0, 0, 30, 60], [5, 5, 0, 0]],  # w = h = 0: dropped
}
_CUHK_POOL = ["s7.jpg", "s5.jpg", "s6.jpg", "s8.jpg", "s9.jpg", "s10.jpg"]  # not Images.mat order
_CUHK_TRAIN = [
    ("p1", [("s1.jpg", [10, 10, 20, 40]), ("s2.jpg", [5, 5, 30, 60])]),
    # the s4 box matches no Images.mat box: logged, s4 stays unlabeled
    ("p2", [("s2.jpg", [60, 10, 25, 50]), ("s3.jpg", [0, 0, 20, 50]), ("s4.jpg", [1, 2, 3, 4])]),
]
_CUHK_QUERIES = [("s5.jpg", [10, 10, 20, 50], "p10", 0), ("s6.jpg", [60, 10, 20, 50], "p11", 1)]
_CUHK_GALLERIES = {
    50: [
        # a duplicate positive (s7 twice) and the query's own image as a positive
        [("s6.jpg", [5, 5, 25, 60]), ("s7.jpg", [20, 20, 20, 40]), ("s7.jpg", [20, 20, 20, 40]),
         ("s5.jpg", [10, 10, 20, 50]), ("s8.jpg", None), ("s9.jpg", None)],
        # one image twice with two boxes of the same id
        [("s8.jpg", [10, 10, 20, 50]), ("s8.jpg", [40, 10, 20, 50]), ("s5.jpg", None),
         ("s9.jpg", None), ("s10.jpg", None), ("s7.jpg", None)],
    ],
    100: [
        [("s6.jpg", [5, 5, 25, 60]), ("s7.jpg", [20, 20, 20, 40]), ("s8.jpg", None),
         ("s9.jpg", None), ("s10.jpg", None)],
        [("s8.jpg", [10, 10, 20, 50]), ("s5.jpg", None), ("s9.jpg", None), ("s10.jpg", None),
         ("s7.jpg", None), ("s7.jpg", None)],
    ],
}


def make_cuhk_sysu_fixture(root: str, image_sizes: dict = None) -> dict:
    """Write a 10-image CUHK-SYSU data set (4 train, 6 test images) into ``root``.

    ``image_sizes`` (name -> (height, width)) overrides the default sizes (all 80 x 100 but
    s2.jpg, 90 x 120); each must hold the image's boxes.

    Content: 2 train identities, 2 test queries with TestG50 and TestG100 lists. Quirks covered:
    interleaved train/test images, pool order different from Images.mat order, zero-size boxes
    (dropped), a train box matching nothing, a uint16 box whose ``x + w`` overflows, duplicate and
    self gallery entries, an image holding the same test id twice, empty (1, 0) idlocate.

    Returns:
        dict with keys
        ``root``;
        ``image_sizes``: name -> (height, width);
        ``train`` / ``test``: name -> list of (xyxy, person_id), in Images.mat order;
        ``num_train_pids``: 2;
        ``dropped_boxes``: {"train": 2, "test": 1};
        ``unmatched_train_boxes``: 1;
        ``queries``: list of (image, xyxy, person_id);
        ``galleries``: gallery size (50, 100, -1) -> per query the list of (image, xyxy or None).
    """
    sizes = {name: (80, 100) for name in _CUHK_IMAGES}
    sizes["s2.jpg"] = (90, 120)
    sizes.update(image_sizes or {})
    for seed, (name, (height, width)) in enumerate(sizes.items()):
        _write_jpeg(os.path.join(root, "Image", "SSM", name), height, width, seed)
    test = {size: [(query, gallery) for query, gallery in zip(_CUHK_QUERIES, lists)]
            for size, lists in _CUHK_GALLERIES.items()}
    write_cuhk_sysu(root, [(n, np.array(b)) for n, b in _CUHK_IMAGES.items()], _CUHK_POOL,
                    _CUHK_TRAIN, test)

    def boxes(name, pids):
        valid = [b for b in _CUHK_IMAGES[name] if b[2] > 0 and b[3] > 0]
        return [(_xyxy(*b), pid) for b, pid in zip(valid, pids)]

    galleries = {size: [[(name, None if box is None else _xyxy(*box)) for name, box in lst]
                        for lst in lists] for size, lists in _CUHK_GALLERIES.items()}
    # psdb.py's full set: the TestG50 list as is, then the other pool images but the query's own
    galleries[-1] = [galleries[50][0] + [("s10.jpg", None)], galleries[50][1]]
    return {
        "root": root,
        "image_sizes": sizes,
        "train": {
            "s1.jpg": boxes("s1.jpg", [0, -1]),
            "s2.jpg": boxes("s2.jpg", [0, 1]),
            "s3.jpg": boxes("s3.jpg", [1, -1]),
            "s4.jpg": boxes("s4.jpg", [-1]),
        },
        "test": {
            "s5.jpg": boxes("s5.jpg", [0, -1]),
            "s6.jpg": boxes("s6.jpg", [0, 1]),
            "s7.jpg": boxes("s7.jpg", [0, -1]),
            "s8.jpg": boxes("s8.jpg", [1, 1]),
            "s9.jpg": boxes("s9.jpg", [-1]),
            "s10.jpg": boxes("s10.jpg", [-1]),
        },
        "num_train_pids": 2,
        "dropped_boxes": {"train": 2, "test": 1},
        "unmatched_train_boxes": 1,
        "queries": [(name, _xyxy(*box), k) for k, (name, box, _, _) in enumerate(_CUHK_QUERIES)],
        "galleries": galleries,
    }


# ------------------------------------------------------------------------------------------------
# PRW
# ------------------------------------------------------------------------------------------------

# frame -> (annotation key, rows [pid, x, y, w, h]); -2 = unlabeled.
_PRW_TRAIN = {
    "c1s1_000001": ("box_new", [[1, 10, 10, 20, 40], [-2, 50, 20, 15.5, 35.5]]),
    "c2s1_000002": ("anno_file", [[932, 5, 5, 30, 60], [5, 60, 10, 25, 50]]),
    "c6s1_000003": ("box_new", [[5, 0, 0, 20, 50]]),
    "c1s1_000004": ("anno_previous", [[-2, 30, 20, 20, 40], [-2, 1, 1, 5, 8]]),  # only -2
}
_PRW_TEST = {
    "c1s2_000010": ("box_new", [[7, 10, 10, 20, 50], [-2, 50, 10, 20, 50]]),
    "c1s2_000011": ("anno_previous", [[9, 5, 5, 25, 60], [3, 60, 10, 20, 50]]),
    "c2s2_000020": ("box_new", [[7, 10.6, 10.2, 20.5, 50.9], [7, 40, 10, 20, 50],
                                [9, 70, 5, 20, 50]]),
    "c3s3_000030": ("anno_file", [[7, -1.703, 20.5, 30.25, 50.75]]),  # negative x
    "c6s2_000040": ("box_new", [[-2, 30, 30, 20, 40]]),  # only -2
    "c2s2_000021": ("box_new", [[9, 20, 20, 20, 40], [3, 0, 0, 30, 60]]),
}
_PRW_ID_TRAIN = [1, 5, 932]
# CRLF line endings as in the original; the third query has a negative x.
_PRW_QUERY_INFO = ("7 10.0000 10.0000 20.0000 50.0000 c1s2_000010\r\n"
                   "9 20.0000 20.0000 20.0000 40.0000 c2s2_000021\r\n"
                   "7 -1.7030 20.5000 30.2500 50.7500 c3s3_000030\r\n")


def make_prw_fixture(root: str) -> dict:
    """Write a 10-frame PRW data set (4 train, 6 test frames, 3 queries) into ``root``.

    Quirks covered: the three annotation keys, CRLF query lines, negative coordinates (clipped),
    fractional coordinates (truncated after adding), a test frame holding the same pid twice,
    frames with only -2 boxes, camera 6 frames of another size, non-contiguous train ids.

    Returns:
        dict with keys
        ``root``;
        ``image_sizes``: "<frame>.jpg" -> (height, width);
        ``camera_ids``: "<frame>.jpg" -> camera;
        ``train`` / ``test``: "<frame>.jpg" -> list of (xyxy, person_id), in frame-list order
        (train ids remapped to 0..2 via ID_train, test ids raw, -1 unlabeled);
        ``num_train_pids``: 3;
        ``queries``: list of (image, xyxy, person_id, camera_id);
        ``galleries``: "standard" / "cross_camera" -> per query the list of (image, xyxy or None).
    """
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    sizes = {}
    for seed, (frame, (key, rows)) in enumerate({**_PRW_TRAIN, **_PRW_TEST}.items()):
        sizes[f"{frame}.jpg"] = (72, 90) if frame.startswith("c6") else (80, 100)
        _write_jpeg(os.path.join(root, "frames", f"{frame}.jpg"), *sizes[f"{frame}.jpg"], seed)
        scipy.io.savemat(os.path.join(root, "annotations", f"{frame}.jpg.mat"),
                         {key: np.array(rows, dtype=np.float64)})
    for split, frames in (("train", _PRW_TRAIN), ("test", _PRW_TEST)):
        cells = np.empty((len(frames), 1), dtype=object)
        for i, frame in enumerate(frames):
            cells[i, 0] = np.array([frame])
        scipy.io.savemat(os.path.join(root, f"frame_{split}.mat"), {f"img_index_{split}": cells})
    scipy.io.savemat(os.path.join(root, "ID_train.mat"),
                     {"ID_train": np.array([_PRW_ID_TRAIN], dtype=np.float64)})
    with open(os.path.join(root, "query_info.txt"), "w", newline="") as f:
        f.write(_PRW_QUERY_INFO)

    test_frames = [f"{frame}.jpg" for frame in _PRW_TEST]

    def gallery(query_frame, positives, cross_camera):
        cam = query_frame[1]
        return [(name, positives.get(name)) for name in test_frames
                if name != query_frame and not (cross_camera and name[1] == cam)]

    positives = [
        {"c2s2_000020.jpg": [10.0, 10.0, 31.0, 61.0], "c3s3_000030.jpg": [0.0, 20.0, 30.0, 71.0]},
        {"c1s2_000011.jpg": [5.0, 5.0, 30.0, 65.0], "c2s2_000020.jpg": [70.0, 5.0, 90.0, 55.0]},
        {"c1s2_000010.jpg": [10.0, 10.0, 30.0, 60.0], "c2s2_000020.jpg": [10.0, 10.0, 31.0, 61.0]},
    ]
    query_frames = ["c1s2_000010.jpg", "c2s2_000021.jpg", "c3s3_000030.jpg"]
    return {
        "root": root,
        "image_sizes": sizes,
        "camera_ids": {name: int(name[1]) for name in sizes},
        "train": {
            "c1s1_000001.jpg": [([10.0, 10.0, 30.0, 50.0], 0), ([50.0, 20.0, 65.0, 55.0], -1)],
            "c2s1_000002.jpg": [([5.0, 5.0, 35.0, 65.0], 2), ([60.0, 10.0, 85.0, 60.0], 1)],
            "c6s1_000003.jpg": [([0.0, 0.0, 20.0, 50.0], 1)],
            "c1s1_000004.jpg": [([30.0, 20.0, 50.0, 60.0], -1), ([1.0, 1.0, 6.0, 9.0], -1)],
        },
        "test": {
            "c1s2_000010.jpg": [([10.0, 10.0, 30.0, 60.0], 7), ([50.0, 10.0, 70.0, 60.0], -1)],
            "c1s2_000011.jpg": [([5.0, 5.0, 30.0, 65.0], 9), ([60.0, 10.0, 80.0, 60.0], 3)],
            "c2s2_000020.jpg": [([10.0, 10.0, 31.0, 61.0], 7), ([40.0, 10.0, 60.0, 60.0], 7),
                                ([70.0, 5.0, 90.0, 55.0], 9)],
            "c3s3_000030.jpg": [([0.0, 20.0, 30.0, 71.0], 7)],
            "c6s2_000040.jpg": [([30.0, 30.0, 50.0, 70.0], -1)],
            "c2s2_000021.jpg": [([20.0, 20.0, 40.0, 60.0], 9), ([0.0, 0.0, 30.0, 60.0], 3)],
        },
        "num_train_pids": 3,
        "queries": [("c1s2_000010.jpg", [10.0, 10.0, 30.0, 60.0], 7, 1),
                    ("c2s2_000021.jpg", [20.0, 20.0, 40.0, 60.0], 9, 2),
                    ("c3s3_000030.jpg", [0.0, 20.0, 30.0, 71.0], 7, 3)],
        "galleries": {
            mode: [gallery(frame, pos, mode == "cross_camera")
                   for frame, pos in zip(query_frames, positives)]
            for mode in ("standard", "cross_camera")
        },
    }
