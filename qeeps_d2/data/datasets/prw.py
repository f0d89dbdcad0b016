"""PRW ("PRW-v16.04.20") and PRW-mini: reader and evaluation protocols (numpy/scipy only).

Layout under ``root`` (datasets-and-protocols.md section 2)::

    frames/<name>.jpg                 e.g. c1s3_016471.jpg
    annotations/<name>.jpg.mat        'box_new' (else 'anno_file', else 'anno_previous'):
                                      (n, 5) rows [pid, x, y, w, h]; pid -2 = unlabeled
    frame_train.mat / frame_test.mat  'img_index_train' / 'img_index_test': names without .jpg
    ID_train.mat                      'ID_train': the 483 train ids
    query_info.txt                    one query per line: "pid x y w h frame" (CRLF in the original)

Boxes (annotations and queries alike) follow SeqNet/NAE: clip ``[x, y, w, h]`` at 0, ``x2 = x + w``
and ``y2 = y + h`` in float, then truncate the four XYXY values to int32. Using one rule for both
keeps a query box equal to its annotation box. (QEEPS ``prw_test.py`` instead truncates
``x, y, w, h`` first and adds without clipping; the two differ by at most 1 px.)

Identities: train pids are remapped to 0..482 in ID_train.mat order; test pids keep their raw
PRW values (>= 1); -2 becomes -1 (unlabeled) in both. Every image dict carries ``camera_id``, the
digit of the first ``c<d>`` in the frame name.

Protocols: the gallery of a query is every test frame except the query frame (with
``cross_camera``: only frames of other cameras); its gt box in a frame is the annotation box of the
query pid there (the first one if the pid appears twice). PRW-mini uses the same protocol with the
30 queries shipped in ``qeeps_d2/data/resources/prwmini_query_info.txt``.

Parsed annotations and image sizes are cached (see :mod:`qeeps_d2.data.datasets.parse_cache`).
"""
from __future__ import annotations

import importlib.resources
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..dataset_dicts import UNLABELED, make_image_dicts
from ..search_protocol import Gallery, Query, SearchProtocol
from .image_sizes import read_image_sizes
from .mat_files import MatLayoutError, read_mat_key
from .parse_cache import Array, ArrayList, cached, file_fingerprint

__all__ = [
    "load_prw",
    "load_prw_protocol",
    "load_prw_mini_protocol",
    "read_prw_mini_query_lines",
    "num_train_pids",
    "camera_id",
    "prw_boxes_to_xyxy",
]

logger = logging.getLogger(__name__)

PRW_UNLABELED = -2
_ANNOTATION_KEYS = ("box_new", "anno_file", "anno_previous")
_SPLIT_FILES = {"train": ("frame_train.mat", "img_index_train"),
                "test": ("frame_test.mat", "img_index_test")}
_CAMERA = re.compile(r"c(\d)")


def camera_id(frame: str) -> int:
    """Camera of a PRW frame name (``"c3s2_044587"`` -> 3), the first ``c<digit>`` in the name."""
    match = _CAMERA.search(frame)
    if match is None:
        raise ValueError(f"PRW frame name {frame!r} holds no camera id (c<digit>)")
    return int(match.group(1))


def prw_boxes_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    """(n, 4) float ``[x, y, w, h]`` -> (n, 4) float64 XYXY with integer values.

    Clip at 0, add in float, truncate to int32 (SeqNet/NAE), e.g.
    ``[-1.703, 20.5, 30.25, 50.75] -> [0, 20, 30, 71]``.
    """
    xywh = np.clip(np.asarray(xywh, np.float64).reshape(-1, 4), 0, None)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return xyxy.astype(np.int32).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# Parsing (cached)
# ------------------------------------------------------------------------------------------------

def _check_root(root: str) -> None:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"PRW root folder not found: {root}")


def _read_frames(root: str, split: str) -> List[str]:
    """Frame names (no extension) of ``split`` in frame_<split>.mat order."""
    if split not in _SPLIT_FILES:
        raise ValueError(f"PRW split must be 'train' or 'test', got {split!r}")
    file_name, key = _SPLIT_FILES[split]
    path = os.path.join(root, file_name)
    value = read_mat_key(path, f"PRW {split} frame list", [key])
    try:
        return [str(np.asarray(cell).reshape(-1)[0]) for cell in value.reshape(-1)]
    except (IndexError, TypeError, ValueError) as e:
        raise MatLayoutError(f"PRW {split} frame list {path}: expected '{key}', a cell column of "
                             f"frame names; {e}") from e


def _annotation_path(root: str, frame: str) -> str:
    return os.path.join(root, "annotations", f"{frame}.jpg.mat")


def _read_annotation(path: str) -> np.ndarray:
    """(n, 5) float64 rows ``[pid, x, y, w, h]`` of one annotation file."""
    value = read_mat_key(path, "PRW annotation", _ANNOTATION_KEYS)
    rows = np.asarray(value)
    if rows.size == 0:
        return np.zeros((0, 5))
    if rows.ndim != 2 or rows.shape[1] != 5 or not np.issubdtype(rows.dtype, np.number):
        raise MatLayoutError(f"PRW annotation {path}: expected an (n, 5) numeric array of "
                             f"[pid, x, y, w, h], got shape {rows.shape} dtype {rows.dtype}")
    return rows.astype(np.float64)


def _read_annotations(root: str, split: str) -> Tuple[List[str], List[np.ndarray]]:
    """Frame names of ``split`` and each frame's (n, 5) annotation rows (cached)."""
    frames = _read_frames(root, split)
    paths = [_annotation_path(root, frame) for frame in frames]
    for frame, path in zip(frames, paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PRW annotation of frame {frame} not found: {path}")
    rows = cached(root, f"prw_{split}_annotations", file_fingerprint(paths),
                  lambda: [_read_annotation(path) for path in paths],
                  ArrayList(Array("float64", (None, 5))))
    return frames, rows


def _read_train_ids(root: str) -> np.ndarray:
    path = os.path.join(root, "ID_train.mat")
    ids = np.asarray(read_mat_key(path, "PRW train id list", ["ID_train"])).reshape(-1)
    if not np.issubdtype(ids.dtype, np.number) or len(set(ids.tolist())) != len(ids):
        raise MatLayoutError(f"PRW train id list {path}: expected 'ID_train', distinct numbers")
    return ids.astype(np.int64)


def _person_ids(raw: np.ndarray, id_map: Optional[Dict[int, int]], path: str) -> np.ndarray:
    """Raw PRW pids -> loader pids: -2 -> -1; train ids through ``id_map``; test ids kept."""
    raw = raw.astype(np.int64)
    out = np.full(len(raw), UNLABELED, np.int64)
    for i, pid in enumerate(raw.tolist()):
        if pid == PRW_UNLABELED:
            continue
        if pid < 1:
            raise ValueError(f"{path}: person id {pid} is neither >= 1 nor -2 (unlabeled)")
        if id_map is None:
            out[i] = pid
        elif pid in id_map:
            out[i] = id_map[pid]
        else:
            raise ValueError(f"{path}: train person id {pid} is not in ID_train.mat")
    return out


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def load_prw(root: str, split: str) -> List[Dict]:
    """Detectron2 dataset dicts of the PRW ``split`` ("train" or "test"), frame-list order.

    Each dict also has ``camera_id`` (1..6). ``person_id``: train 0..482 (ID_train.mat order),
    test the raw PRW id, -1 unlabeled. ``image_id`` is ``"<frame>.jpg"``.

    Raises:
        FileNotFoundError: root, a list, an annotation or a frame image is missing.
        ValueError: wrong .mat layout, unknown train id, a zero-size box or one outside its image.
    """
    _check_root(root)
    frames, rows = _read_annotations(root, split)
    id_map = None
    if split == "train":
        id_map = {pid: k for k, pid in enumerate(_read_train_ids(root).tolist())}
    image_dir = os.path.join(os.path.abspath(root), "frames")
    names = [f"{frame}.jpg" for frame in frames]
    sizes = read_image_sizes(root, f"prw_{split}_sizes", image_dir, names)
    pids = [_person_ids(ann[:, 0], id_map, _annotation_path(root, frame))
            for frame, ann in zip(frames, rows)]
    flat = np.concatenate(rows) if rows else np.zeros((0, 5))
    dicts, past_border = make_image_dicts(
        [os.path.join(image_dir, name) for name in names], sizes, [len(ann) for ann in rows],
        prw_boxes_to_xyxy(flat[:, 1:]), np.concatenate(pids) if pids else np.zeros(0, np.int64),
        extra={"camera_id": [camera_id(frame) for frame in frames]})
    if past_border:
        logger.info("PRW %s: %d boxes extend past their image border (kept as is)", split,
                    past_border)
    return dicts


def num_train_pids(root: str) -> int:
    """Number of labeled train identities (entries of ID_train.mat; 483 for PRW)."""
    _check_root(root)
    return len(_read_train_ids(root))


def read_prw_mini_query_lines() -> List[str]:
    """The 30 lines of the shipped PRW-mini query list (QEEPS ``prwmini_query_info.txt``)."""
    resource = importlib.resources.files("qeeps_d2.data") / "resources" / "prwmini_query_info.txt"
    return resource.read_text(encoding="ascii").splitlines()


def load_prw_protocol(root: str, query_file: Optional[str] = None, cross_camera: bool = False,
                      name: Optional[str] = None, dataset: str = "prw_test") -> SearchProtocol:
    """The PRW search protocol: queries of ``query_file`` against the test frames.

    Args:
        root: PRW root.
        query_file: query list in the query_info.txt format; default ``root/query_info.txt``.
        cross_camera: restrict each gallery to frames of other cameras than the query's.
        name: protocol name; default ``dataset`` plus ``"/cross_camera"`` when restricted.
        dataset: the registered data set the protocol belongs to.
    Raises:
        FileNotFoundError: a needed file is missing.
        ValueError: a malformed query line or a query frame that is not a test frame.
    """
    _check_root(root)
    query_file = query_file or os.path.join(root, "query_info.txt")
    if not os.path.isfile(query_file):
        raise FileNotFoundError(f"PRW query list not found: {query_file}")
    with open(query_file, "r", encoding="ascii") as f:
        lines = f.read().splitlines()
    return _protocol(root, lines, query_file, cross_camera, name, dataset)


def load_prw_mini_protocol(root: str, cross_camera: bool = False,
                           dataset: str = "prw_mini_test") -> SearchProtocol:
    """PRW-mini: the 30 shipped queries, each against the whole PRW test gallery."""
    _check_root(root)
    return _protocol(root, read_prw_mini_query_lines(), "prwmini_query_info.txt (package data)",
                     cross_camera, None, dataset)


def _parse_query_lines(lines: Sequence[str], source: str):
    """query_info lines -> list of (line number, pid, (4,) xywh, frame); blank lines skipped."""
    queries = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 6:
                raise ValueError(f"{len(fields)} fields")
            pid, xywh, frame = int(fields[0]), np.array(fields[1:5], np.float64), fields[5]
        except ValueError as e:
            raise ValueError(f"{source} line {number}: expected 'pid x y w h frame', got "
                             f"{line.strip()!r} ({e})") from e
        queries.append((number, pid, xywh, frame))
    return queries


def _protocol(root: str, lines: Sequence[str], source: str, cross_camera: bool,
              name: Optional[str], dataset: str) -> SearchProtocol:
    frames, rows = _read_annotations(root, "test")
    position = {frame: i for i, frame in enumerate(frames)}
    cameras = np.array([camera_id(frame) for frame in frames])
    images = np.asarray([f"{frame}.jpg" for frame in frames], dtype=object)
    # pid -> {frame position: first box of the pid in that frame}
    boxes_of: Dict[int, Dict[int, np.ndarray]] = {}
    for i, ann in enumerate(rows):
        xyxy = prw_boxes_to_xyxy(ann[:, 1:])
        for pid, box in zip(ann[:, 0].astype(np.int64).tolist(), xyxy):
            if pid != PRW_UNLABELED:
                boxes_of.setdefault(pid, {}).setdefault(i, box)

    queries, query_frames = [], []
    for number, pid, xywh, frame in _parse_query_lines(lines, source):
        if frame not in position:
            raise ValueError(f"{source} line {number}: query frame {frame} is not a PRW test frame")
        queries.append(Query(index=len(queries), image=f"{frame}.jpg",
                             box=prw_boxes_to_xyxy(xywh)[0], person_id=pid,
                             camera_id=camera_id(frame)))
        query_frames.append(position[frame])

    def gallery(i: int) -> Gallery:
        keep = np.ones(len(frames), dtype=bool)
        keep[query_frames[i]] = False
        if cross_camera:
            keep &= cameras != queries[i].camera_id
        gt = np.full((len(frames), 4), np.nan)
        for j, box in boxes_of.get(queries[i].person_id, {}).items():
            gt[j] = box
        return Gallery(images=images[keep].tolist(), gt_boxes=gt[keep])

    if name is None:
        name = dataset + ("/cross_camera" if cross_camera else "")
    return SearchProtocol(name=name, dataset=dataset, queries=queries, gallery_fn=gallery,
                          image_root=os.path.join(os.path.abspath(root), "frames"))
