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

from qeeps_d2.data.cuhk_sysu import write_cuhk_sysu

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


def make_cuhk_sysu_fixture(root: str) -> dict:
    """Write a 10-image CUHK-SYSU data set (4 train, 6 test images) into ``root``.

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
    galleries[-1] = [
        [("s7.jpg", _xyxy(20, 20, 20, 40)), ("s6.jpg", _xyxy(5, 5, 25, 60)), ("s8.jpg", None),
         ("s9.jpg", None), ("s10.jpg", None)],
        [("s7.jpg", None), ("s5.jpg", None), ("s8.jpg", _xyxy(10, 10, 20, 50)), ("s9.jpg", None),
         ("s10.jpg", None)],
    ]
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
