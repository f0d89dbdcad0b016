"""CUHK-SYSU ("psdb") in its official layout: reader, evaluation protocol and writer (numpy/scipy).

Layout under ``root`` (datasets-and-protocols.md section 1)::

    Image/SSM/s<N>.jpg
    annotation/Images.mat                       'Img'  (1, N) struct (imname, nAppear, box)
    annotation/pool.mat                         'pool' cell of the test image names
    annotation/test/train_test/Train.mat        'Train' cell of (1, 1) structs
                                                (idname, nAppear, scene)
    annotation/test/train_test/TestG<N>.mat     'TestG<N>' (1, Q) struct (Query, Gallery)

Boxes are ``[x, y, w, h]`` (stored as uint16 in the official files): they are cast to float64
before ``x2 = x + w, y2 = y + h`` so that uint16 never overflows; no +-1 offset.

Reading follows the reference loaders (OIM ``psdb.py``, SeqNet ``cuhk_sysu.py``):

* split: test = the images of pool.mat, train = Images.mat minus pool.mat; both splits keep the
  Images.mat order;
* Images.mat holds every person; boxes with ``w <= 0`` or ``h <= 0`` are dropped (logged with a
  count) and every image must keep at least one box;
* person ids by exact box equality (all four integers) with the first matching box of that
  image: train id k = the k-th entry of Train.mat (0..5531); test id k = the k-th TestG50 query
  (its query box and every non-empty gallery box). Boxes not found are logged with a count, as
  psdb.py warns. Every other box is unlabeled (-1).

Mat fields are read positionally where the reference loaders do (Images.mat, Train.mat, gallery
records) and by name where the files were verified (TestG ``Query``/``Gallery`` and the query
fields ``imname, idlocate, ishard, idname``).

Parsed .mat content and image sizes are cached (see :mod:`qeeps_d2.data.datasets.parse_cache`).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..dataset_dicts import UNLABELED, make_image_dicts
from ..search_protocol import Gallery, Query, SearchProtocol
from .image_sizes import read_image_sizes
from .mat_files import MatLayoutError, read_mat_key, write_mat
from .parse_cache import STRINGS, Array, cached, file_fingerprint

__all__ = [
    "GALLERY_SIZES",
    "load_cuhk_sysu",
    "load_cuhk_sysu_protocol",
    "available_gallery_sizes",
    "num_train_pids",
    "read_test_pool",
    "write_cuhk_sysu",
]

logger = logging.getLogger(__name__)

GALLERY_SIZES = (50, 100, 500, 1000, 2000, 4000)
"""Gallery sizes of the official TestG files; -1 additionally means the whole pool."""

IMAGE_DIR = os.path.join("Image", "SSM")
_IMAGES = os.path.join("annotation", "Images.mat")
_POOL = os.path.join("annotation", "pool.mat")
_TRAIN_TEST = os.path.join("annotation", "test", "train_test")
_TRAIN = os.path.join(_TRAIN_TEST, "Train.mat")


def _testg_path(root: str, gallery_size: int) -> str:
    return os.path.join(root, _TRAIN_TEST, f"TestG{gallery_size}.mat")


# ------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------

def _struct(shape: Tuple[int, ...], fields: Sequence[str]) -> np.ndarray:
    """An empty MATLAB struct array (numpy record array of object fields) for scipy.io.savemat."""
    return np.empty(shape, dtype=[(f, object) for f in fields])


def _uint16_box(box, where: str) -> np.ndarray:
    """(1, 4) uint16 ``[x, y, w, h]`` from integer-valued input, or ValueError naming ``where``."""
    arr = np.asarray(box)
    if arr.shape != (4,) or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)) \
            or arr.min() < 0 or arr.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"{where}: box must be 4 integers in 0..65535 ([x, y, w, h]), got {box!r}")
    return arr.astype(np.uint16).reshape(1, 4)


def write_cuhk_sysu(root: str, images, pool, train, test) -> None:
    """Write the annotation .mat files of a data set in the official CUHK-SYSU struct layout.

    The images themselves are the caller's job (``root/Image/SSM/<imname>``).

    Args:
        root: data set root; ``root/annotation/...`` is created.
        images: list of ``(imname, boxes)`` in Images.mat order, ``boxes`` an (n, 4) integer
            ``[x, y, w, h]`` array of every person in the image (n >= 1) -> Images.mat.
        pool: list of the test image names -> pool.mat.
        train: list of ``(idname, [(imname, xywh), ...])``, one per labeled train identity ->
            Train.mat.
        test: dict ``gallery_size -> [(query, gallery), ...]`` over the queries, where
            ``query = (imname, xywh, idname, ishard)`` and
            ``gallery = [(imname, xywh or None), ...]`` with the positives (boxes) first ->
            ``TestG<gallery_size>.mat``. Size 50 is required (the reader takes the queries from
            it) and every size must list the same queries in the same order.
    Raises:
        ValueError: inconsistent input (unknown or duplicate image, train image in the pool, a
            gallery with a positive after a negative, boxes that are not uint16 integers, ...).
    """
    image_names = [name for name, _ in images]
    if len(set(image_names)) != len(image_names):
        raise ValueError("write_cuhk_sysu: duplicate image names in images")
    known, pool_set = set(image_names), set(pool)
    if len(pool_set) != len(pool):
        raise ValueError("write_cuhk_sysu: duplicate image names in pool")
    unknown = sorted(pool_set - known)
    if unknown:
        raise ValueError(f"write_cuhk_sysu: pool images not in images: {unknown[:5]}")

    img = _struct((1, len(images)), ["imname", "nAppear", "box"])
    for i, (name, boxes) in enumerate(images):
        rows = np.asarray(boxes).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
        if len(rows) == 0:
            raise ValueError(f"write_cuhk_sysu: image {name} has no person box")
        box = _struct((1, len(rows)), ["idlocate"])
        for j, row in enumerate(rows):
            box["idlocate"][0, j] = _uint16_box(row, f"write_cuhk_sysu: image {name}")
        img["imname"][0, i] = name
        img["nAppear"][0, i] = np.array([[len(rows)]], dtype=np.float64)
        img["box"][0, i] = box

    train_cell = np.empty((len(train), 1), dtype=object)
    for k, (idname, scenes) in enumerate(train):
        scene = _struct((1, len(scenes)), ["imname", "idlocate", "ishard"])
        for j, (name, xywh) in enumerate(scenes):
            if name not in known or name in pool_set:
                raise ValueError(f"write_cuhk_sysu: train identity {idname} is in image {name}, "
                                 "which is not a train image")
            scene["imname"][0, j] = name
            scene["idlocate"][0, j] = _uint16_box(
                xywh, f"write_cuhk_sysu: train {idname} in {name}")
            scene["ishard"][0, j] = np.zeros((1, 1), dtype=np.uint8)
        person = _struct((1, 1), ["idname", "nAppear", "scene"])
        person["idname"][0, 0] = idname
        person["nAppear"][0, 0] = np.array([[len(scenes)]], dtype=np.float64)
        person["scene"][0, 0] = scene
        train_cell[k, 0] = person

    testg = {size: _testg_struct(size, entries, pool_set) for size, entries in test.items()}
    if 50 not in testg:
        raise ValueError("write_cuhk_sysu: test must contain gallery size 50 (TestG50 holds the "
                         "queries)")
    reference = [query for query, _ in test[50]]
    for size, entries in test.items():
        if not _same_queries(entries, reference):
            raise ValueError(f"write_cuhk_sysu: TestG{size} does not list the queries of TestG50 "
                             "in the same order")

    pool_cell = np.array(list(pool), dtype=object).reshape(-1, 1)
    write_mat(os.path.join(root, _POOL), {"pool": pool_cell})
    write_mat(os.path.join(root, _TRAIN), {"Train": train_cell})
    for size, struct in testg.items():
        write_mat(_testg_path(root, size), {f"TestG{size}": struct})
    # Images.mat last: once it exists, the annotation is complete.
    write_mat(os.path.join(root, _IMAGES), {"Img": img})


def _same_queries(entries, reference) -> bool:
    if len(entries) != len(reference):
        return False
    for (query, _), ref in zip(entries, reference):
        if query[0] != ref[0] or query[2] != ref[2] or not np.array_equal(query[1], ref[1]):
            return False
    return True


def _testg_struct(size: int, entries, pool_set) -> np.ndarray:
    """The ``TestG<size>`` (1, Q) struct of (Query, Gallery) for :func:`write_cuhk_sysu`."""
    testg = _struct((1, len(entries)), ["Query", "Gallery"])
    for i, ((imname, xywh, idname, ishard), gallery) in enumerate(entries):
        where = f"write_cuhk_sysu: TestG{size} query {i} ({idname})"
        if imname not in pool_set:
            raise ValueError(f"{where}: query image {imname} is not in the pool")
        query = _struct((1, 1), ["imname", "idlocate", "ishard", "idname"])
        query["imname"][0, 0] = imname
        query["idlocate"][0, 0] = _uint16_box(xywh, where)
        query["ishard"][0, 0] = np.array([[int(ishard)]], dtype=np.uint8)
        query["idname"][0, 0] = idname
        records = _struct((1, len(gallery)), ["imname", "idlocate", "ishard"])
        seen_negative = False
        for j, (name, box) in enumerate(gallery):
            if name not in pool_set:
                raise ValueError(f"{where}: gallery image {name} is not in the pool")
            if box is None:
                seen_negative = True
                records["idlocate"][0, j] = np.zeros((1, 0), dtype=np.float64)
            elif seen_negative:
                raise ValueError(f"{where}: gallery entry {j} ({name}) is a positive after a "
                                 "negative; positives must come first")
            else:
                records["idlocate"][0, j] = _uint16_box(box, f"{where} gallery {name}")
            records["imname"][0, j] = name
            records["ishard"][0, j] = np.zeros((1, 1), dtype=np.uint8)
        testg["Query"][0, i] = query
        testg["Gallery"][0, i] = records
    return testg


# ------------------------------------------------------------------------------------------------
# Parsing of the .mat files (cached)
# ------------------------------------------------------------------------------------------------

def _parse(path: str, what: str, key: str, layout: str, parser):
    """Load ``key`` from ``path`` and run ``parser`` on it; layout errors become ValueError."""
    value = read_mat_key(path, what, [key])
    try:
        return parser(value)
    except (IndexError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise MatLayoutError(f"{what} {path}: expected {layout}; {type(e).__name__}: {e}") from e


# Layouts of the cached parses (see parse_cache): xywh boxes, counts/ids, names.
_BOXES = Array("float64", (None, 4))
_INDICES = Array("int64", (None,))
_IMAGES_SPEC = (STRINGS, _INDICES, _BOXES)
_TRAIN_SPEC = (STRINGS, _INDICES, STRINGS, _BOXES)
_TESTG_SPEC = {
    "query_images": STRINGS, "query_boxes": _BOXES, "query_idnames": STRINGS,
    "query_ishard": _INDICES, "names": STRINGS, "offsets": _INDICES,
    "entry_names": Array("int32", (None,)), "positive_entries": _INDICES,
    "positive_boxes": _BOXES,
}


def _cached_parse(root: str, path: str, tag: str, spec, compute):
    """``compute()`` (the parse of ``path``) through the cache, checked against ``spec``."""
    if not os.path.isfile(path):
        return compute()  # raises the FileNotFoundError naming the file
    return cached(root, tag, file_fingerprint([path]), compute, spec)


def _name(cell) -> str:
    """A MATLAB char array as loaded by scipy (``array(['s1.jpg'])``) -> ``'s1.jpg'``."""
    return str(np.asarray(cell).reshape(-1)[0])


def _box(cell) -> np.ndarray:
    """A (1, 4) box cell -> (4,) float64 (exact for uint16 / double inputs)."""
    box = np.asarray(cell, dtype=np.float64).reshape(-1)
    if box.shape != (4,):
        raise ValueError(f"a box must have 4 values, got shape {np.shape(cell)}")
    return box


def _read_images(root: str):
    """Images.mat -> (names, counts (N,), boxes (M, 4) float64 xywh), boxes unfiltered."""
    path = os.path.join(root, _IMAGES)

    def parse(img):
        names, counts, boxes = [], [], []
        for rec in img.reshape(-1):
            names.append(_name(rec[0]))
            rows = [_box(b[0]) for b in rec[2].reshape(-1)]
            counts.append(len(rows))
            boxes.extend(rows)
        return names, np.asarray(counts, np.int64), np.asarray(boxes, np.float64).reshape(-1, 4)

    return _cached_parse(root, path, "cuhk_images", _IMAGES_SPEC, lambda: _parse(
        path, "CUHK-SYSU image list", "Img",
        "'Img' struct array of (imname, nAppear, box) with (1, n) box structs of [x, y, w, h]",
        parse))


def read_test_pool(root: str) -> List[str]:
    """The image names of CUHK-SYSU's test pool (``pool.mat``), in the file's order."""
    path = os.path.join(root, _POOL)
    return _cached_parse(root, path, "cuhk_pool", STRINGS, lambda: _parse(
        path, "CUHK-SYSU test pool list", "pool", "'pool' cell array of image names",
        lambda pool: [_name(a) for a in pool.reshape(-1)]))


def _read_train(root: str):
    """Train.mat -> (idnames, scene_person (S,), scene_images [S], scene_boxes (S, 4) xywh)."""
    path = os.path.join(root, _TRAIN)

    def parse(train):
        idnames, person, names, boxes = [], [], [], []
        for k, item in enumerate(train.reshape(-1)):
            rec = np.asarray(item).reshape(-1)[0]
            idnames.append(_name(rec[0]))
            for scene in rec[2].reshape(-1):
                person.append(k)
                names.append(_name(scene[0]))
                boxes.append(_box(scene[1]))
        return (idnames, np.asarray(person, np.int64), names,
                np.asarray(boxes, np.float64).reshape(-1, 4))

    return _cached_parse(root, path, "cuhk_train", _TRAIN_SPEC, lambda: _parse(
        path, "CUHK-SYSU train identities", "Train",
        "'Train' cell of (1, 1) structs (idname, nAppear, scene)", parse))


def _read_testg(root: str, gallery_size: int) -> Dict[str, object]:
    """TestG<N>.mat -> dict of query arrays and flattened galleries.

    Keys: ``query_images`` [Q], ``query_boxes`` (Q, 4) xywh, ``query_idnames`` [Q],
    ``query_ishard`` (Q,), ``names`` (distinct gallery image names), ``offsets`` (Q + 1,) into the
    flattened entries, ``entry_names`` (E,) int32 into ``names``, ``positive_entries`` (P,) sorted
    flat indices of the entries with a box and ``positive_boxes`` (P, 4) xywh.
    """
    path = _testg_path(root, gallery_size)

    def parse(testg):
        testg = testg.reshape(-1)
        q_images, q_boxes, q_ids, q_hard = [], [], [], []
        names: Dict[str, int] = {}
        offsets, entry_names, pos_entries, pos_boxes = [0], [], [], []
        for query, gallery in zip(testg["Query"], testg["Gallery"]):
            query = np.asarray(query).reshape(-1)[0]
            q_images.append(_name(query["imname"]))
            q_boxes.append(_box(query["idlocate"]))
            q_ids.append(_name(query["idname"]))
            q_hard.append(int(np.asarray(query["ishard"]).reshape(-1)[0]))
            for rec in gallery.reshape(-1):
                if np.size(rec[1]):
                    pos_entries.append(len(entry_names))
                    pos_boxes.append(_box(rec[1]))
                entry_names.append(names.setdefault(_name(rec[0]), len(names)))
            offsets.append(len(entry_names))
        return {
            "query_images": q_images, "query_boxes": np.asarray(q_boxes, np.float64).reshape(-1, 4),
            "query_idnames": q_ids, "query_ishard": np.asarray(q_hard, np.int64),
            "names": list(names), "offsets": np.asarray(offsets, np.int64),
            "entry_names": np.asarray(entry_names, np.int32),
            "positive_entries": np.asarray(pos_entries, np.int64),
            "positive_boxes": np.asarray(pos_boxes, np.float64).reshape(-1, 4),
        }

    return _cached_parse(root, path, f"cuhk_testg{gallery_size}", _TESTG_SPEC, lambda: _parse(
        path, f"CUHK-SYSU TestG{gallery_size} protocol", f"TestG{gallery_size}",
        "(1, Q) struct of (Query, Gallery); Query (imname, idlocate, ishard, idname); Gallery "
        "records (imname, idlocate, ishard)", parse))


# ------------------------------------------------------------------------------------------------
# Splits and labels
# ------------------------------------------------------------------------------------------------

def _xyxy(xywh: np.ndarray) -> np.ndarray:
    """(n, 4) float ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]``."""
    xywh = np.asarray(xywh, np.float64).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _split_annotations(root: str, split: str):
    """The images of ``split`` in Images.mat order with their valid boxes and person ids.

    Returns:
        names [N], counts (N,) boxes per image, boxes (M, 4) xywh float64 (consecutive per
        image), pids (M,) int64.
    """
    if split not in ("train", "test"):
        raise ValueError(f"CUHK-SYSU split must be 'train' or 'test', got {split!r}")
    names, counts, boxes = _read_images(root)
    pool = read_test_pool(root)
    index = {name: i for i, name in enumerate(names)}
    missing = [name for name in pool if name not in index]
    if missing:
        raise ValueError(f"{os.path.join(root, _POOL)}: {len(missing)} pool images are not in "
                         f"Images.mat, e.g. {missing[:3]}")
    pool_set = set(pool)
    in_split = np.array([(name in pool_set) == (split == "test") for name in names], dtype=bool)
    owner = np.repeat(np.arange(len(names)), counts)
    valid = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    keep = in_split[owner] & valid
    dropped = int((in_split[owner] & ~valid).sum())
    if dropped:
        logger.info("CUHK-SYSU %s: dropped %d boxes with w <= 0 or h <= 0 (Images.mat)", split,
                    dropped)
    kept = np.bincount(owner[keep], minlength=len(names))
    empty = np.flatnonzero(in_split & (kept == 0))
    if len(empty):
        raise ValueError(f"{os.path.join(root, _IMAGES)}: image {names[empty[0]]} has no box with "
                         "positive width and height")
    out_names = [name for name, inside in zip(names, in_split) if inside]
    out_counts, out_boxes = kept[in_split], boxes[keep]

    if split == "train":
        _, person, scene_names, scene_boxes = _read_train(root)
        source = os.path.join(root, _TRAIN)
    else:
        person, scene_names, scene_boxes = _test_labels(_read_testg(root, 50))
        source = _testg_path(root, 50)
    pids = _assign_pids(out_names, out_counts, out_boxes, person, scene_names, scene_boxes, source)
    return out_names, out_counts, out_boxes, pids


def _test_labels(testg):
    """Labeled test boxes of TestG50: the query box and non-empty gallery boxes of query k -> k."""
    person = list(range(len(testg["query_images"])))
    names = list(testg["query_images"])
    boxes = [testg["query_boxes"]]
    owner = np.searchsorted(testg["offsets"], testg["positive_entries"], side="right") - 1
    person.extend(owner.tolist())
    names.extend(testg["names"][testg["entry_names"][e]] for e in testg["positive_entries"])
    boxes.append(testg["positive_boxes"])
    return np.asarray(person, np.int64), names, np.concatenate(boxes).reshape(-1, 4)


def _assign_pids(names, counts, boxes, person, scene_names, scene_boxes,
                 source: str) -> np.ndarray:
    """Person ids of ``boxes``: ``person[s]`` for the first box of image ``scene_names[s]`` equal
    to ``scene_boxes[s]`` (all four values), -1 for the boxes no scene matches."""
    owner = np.repeat(np.arange(len(names)), counts).tolist()
    first: Dict[tuple, int] = {}
    for k, (i, box) in enumerate(zip(owner, boxes.tolist())):
        first.setdefault((names[i], *box), k)
    pids = [UNLABELED] * len(boxes)
    not_found, conflicts = [], 0
    for pid, name, box in zip(person.tolist(), scene_names, scene_boxes.tolist()):
        k = first.get((name, *box))
        if k is None:
            not_found.append((pid, name, [int(v) for v in box]))
            continue
        conflicts += pids[k] not in (UNLABELED, pid)
        pids[k] = pid
    if not_found:
        logger.warning("%s: %d labeled boxes match no box of their image in the split (left "
                       "unlabeled), e.g. (pid, image, xywh) %s", source, len(not_found),
                       not_found[:3])
    if conflicts:
        logger.warning("%s: %d boxes were labeled with two different ids (the last one kept)",
                       source, conflicts)
    return np.asarray(pids, np.int64)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def load_cuhk_sysu(root: str, split: str) -> List[Dict]:
    """Detectron2 dataset dicts of the CUHK-SYSU ``split`` ("train" or "test").

    Images in Images.mat order; see :mod:`qeeps_d2.data.dataset_dicts` for the dict format.
    Labeled persons have ``person_id`` >= 0 (train: Train.mat index, 0..5531; test: TestG50 query
    index, 0..2899), the others -1.

    Raises:
        FileNotFoundError: root, an annotation file or an image is missing.
        ValueError: a file has the wrong layout, a pool image is unknown, a box is out of its image.
    """
    _check_root(root)
    names, counts, boxes, pids = _split_annotations(root, split)
    image_dir = os.path.join(os.path.abspath(root), IMAGE_DIR)
    sizes = read_image_sizes(root, f"cuhk_{split}_sizes", image_dir, names)
    dicts, past_border = make_image_dicts([os.path.join(image_dir, name) for name in names],
                                          sizes, counts, _xyxy(boxes), pids)
    if past_border:
        logger.info("CUHK-SYSU %s: %d boxes extend past their image border (kept as is)", split,
                    past_border)
    return dicts


def available_gallery_sizes(root: str) -> List[int]:
    """The official gallery sizes whose TestG file exists under ``root``, plus -1 (whole pool).
    A missing ``root`` is a FileNotFoundError naming it (not an empty list of sizes)."""
    _check_root(root)
    return [s for s in GALLERY_SIZES if os.path.isfile(_testg_path(root, s))] + [-1]


def num_train_pids(root: str) -> int:
    """Number of labeled train identities (entries of Train.mat)."""
    _check_root(root)
    return len(_read_train(root)[0])


def load_cuhk_sysu_protocol(root: str, gallery_size: int = 100,
                            dataset: str = "cuhk_sysu_test") -> SearchProtocol:
    """The CUHK-SYSU search protocol with galleries of ``gallery_size`` images.

    Queries: TestG50 ``Query`` in file order, ``person_id`` = query index. Gallery of query i:
    ``TestG<N>['Gallery'][i]`` as is (duplicates and entries of the query image kept), the gt box
    of an entry from its ``idlocate`` (NaN row when empty). ``gallery_size=-1`` ("full set", as
    psdb.py): the TestG50 list as is (its duplicate and self entries kept, as for the other sizes,
    so ``count_gt`` is TestG50's), then every other pool image in pool.mat order, except the query
    image and the images already listed, as negatives.

    Args:
        root: data set root.
        gallery_size: one of 50, 100, 500, 1000, 2000, 4000 or -1.
        dataset: registered data set name; the protocol is named ``"<dataset>/G<gallery_size>"``.
    Raises:
        FileNotFoundError: a needed file is missing.
        ValueError: unknown gallery size, wrong layout, or a TestG file whose queries differ from
            TestG50's.
    """
    if gallery_size not in GALLERY_SIZES + (-1,):
        raise ValueError(f"CUHK-SYSU gallery_size must be one of {GALLERY_SIZES + (-1,)}, got "
                         f"{gallery_size!r}")
    _check_root(root)
    base = _read_testg(root, 50)
    queries = [Query(index=k, image=name, box=_xyxy(box)[0], person_id=k)
               for k, (name, box) in enumerate(zip(base["query_images"], base["query_boxes"]))]
    if gallery_size == -1:
        gallery_fn = _full_set_galleries(_list_galleries(base), read_test_pool(root), queries)
    else:
        testg = base if gallery_size == 50 else _read_testg(root, gallery_size)
        _check_same_queries(base, testg, _testg_path(root, gallery_size))
        gallery_fn = _list_galleries(testg)
    return SearchProtocol(name=f"{dataset}/G{gallery_size}", dataset=dataset, queries=queries,
                          gallery_fn=gallery_fn,
                          image_root=os.path.join(os.path.abspath(root), IMAGE_DIR))


def _check_root(root: str) -> None:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CUHK-SYSU root folder not found: {root}")


def _check_same_queries(base, testg, path: str) -> None:
    if testg is base:
        return
    if len(testg["query_images"]) != len(base["query_images"]):
        raise ValueError(f"{path}: {len(testg['query_images'])} queries, but TestG50 has "
                         f"{len(base['query_images'])}")
    differ = [i for i, (a, b) in enumerate(zip(testg["query_images"], base["query_images"]))
              if a != b]
    differ += np.flatnonzero((testg["query_boxes"] != base["query_boxes"]).any(1)).tolist()
    if differ:
        raise ValueError(f"{path}: query {min(differ)} differs from TestG50's (image or box); "
                         "the TestG files must list the same queries in the same order")


def _list_galleries(testg):
    names = testg["names"]
    offsets, entry_names = testg["offsets"], testg["entry_names"]
    pos_entries, pos_boxes = testg["positive_entries"], _xyxy(testg["positive_boxes"])

    def gallery(i: int) -> Gallery:
        start, stop = int(offsets[i]), int(offsets[i + 1])
        gt = np.full((stop - start, 4), np.nan)
        lo, hi = np.searchsorted(pos_entries, [start, stop])
        gt[pos_entries[lo:hi] - start] = pos_boxes[lo:hi]
        return Gallery(images=[names[j] for j in entry_names[start:stop]], gt_boxes=gt)

    return gallery


def _full_set_galleries(listed, pool: List[str], queries: List[Query]):
    """psdb.py's full set: gallery ``listed(i)`` (TestG50's, kept as is) followed by the pool
    images it does not name, in pool order, without query i's own image, all negatives."""
    position = {name: j for j, name in enumerate(pool)}
    pool_names = np.asarray(pool, dtype=object)

    def gallery(i: int) -> Gallery:
        head = listed(i)
        keep = np.ones(len(pool), dtype=bool)
        keep[[position[n] for n in {*head.images, queries[i].image} if n in position]] = False
        rest = pool_names[keep].tolist()
        return Gallery(images=head.images + rest,
                       gt_boxes=np.concatenate([head.gt_boxes, np.full((len(rest), 4), np.nan)]))

    return gallery
