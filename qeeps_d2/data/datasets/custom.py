"""Custom person-search data sets: one JSON file per set, read and checked (numpy only).

A file (``.json``, or gzip-compressed ``.json.gz``) holds one data set::

    {"format": "qeeps-person-search", "version": 1,
     "name": "shop_test",                  # the name it is registered under from a config
     "image_root": "images",               # optional; relative to the JSON file's folder
                                           # (default: that folder), or absolute
     "description": "...",                 # optional, free text
     "images": [
       {"file_name": "cam1/000123.jpg",    # relative to image_root; also the image's id
        "width": 1920, "height": 1080,     # pixels (the images are not opened to read them)
        "camera_id": 1,                    # optional, an integer >= 0: on every image or none
        "boxes": [{"box": [x1, y1, x2, y2], "person_id": 7},      # XYXY absolute pixels
                  {"box": [x1, y1, x2, y2], "person_id": -1}]},   # -1 = unlabeled person
       ...],
     "protocol": {                         # optional: a set with a protocol is a test set
       "gallery": "all_other_images",      # or "other_cameras" or "explicit"
       "queries": [
         {"image": "cam1/000123.jpg", "box": [x1, y1, x2, y2], "person_id": 7,
          "camera_id": 1},                 # optional; must be the query image's
         ...]}}

**Training sets** (no ``protocol``): the labeled ``person_id`` values (any integers >= 0) are
numbered 0..N-1 in increasing order when loaded, N = the number of distinct ones: the OIM
table's size (``MODEL.QEEPS.OIM.NUM_PIDS`` 0 is set to N). The built-in loaders number their
identities 0..N-1 too (CUHK-SYSU in Train.mat order, PRW in ID_train.mat order).

**Test sets** keep their person ids as written. Each query is searched in a gallery, an ordered
list of images; the query person's box in a gallery image (its target) is the first box of that
image with the query's ``person_id``, if any. The gallery of a query comes from the rule in
``protocol.gallery``:

* ``"all_other_images"`` (PRW, PRW-mini): every image of the file but the query's own, in file
  order. If every image has a ``camera_id``, the cross-camera setting (``--cross-camera``,
  ``TEST.PERSON_SEARCH.CROSS_CAMERA``) keeps only images of other cameras than the query's.
* ``"other_cameras"``: every image of another camera than the query's (needs camera ids).
* ``"explicit"`` (CUHK-SYSU, SynthPS): each query lists its gallery, ``"gallery": [ENTRY, ...]``.
  With ``"gallery_sizes": [50, 100, ...]`` in the protocol, each query instead lists one
  gallery per size, ``"galleries": {"50": [...], "100": [...]}``, and a size is chosen at
  evaluation (``--gallery-size``, ``TEST.PERSON_SEARCH.GALLERY_SIZE``); size -1 is then the
  whole pool, as CUHK-SYSU's: the smallest size's list, then every other image of
  ``protocol.pool`` (optional, a list of image names; default: every image, in file order)
  except the query's own image, without targets.
  An ENTRY is an image name (its target as above) or ``{"image": name, "box": [x1, y1, x2, y2]
  or null}``, which gives the target box explicitly (``null``: no target). Entries may repeat
  an image (CUHK-SYSU's lists do; each entry is scored on its own).

Protocol names: the data set name, ``<name>/cross_camera`` (cross-camera setting or
``"other_cameras"``), ``<name>/G<size>`` (explicit galleries with sizes).

Every mistake is one ``ValueError`` line naming the file and the field, e.g.
``my.json: images[3].boxes[0].box: x2 (10) <= x1 (12)``: unknown or missing fields, wrong
types, boxes of zero size or outside their image, duplicate file names, names that are not
normalised relative paths, unknown images in queries and galleries, person ids < -1 (queries:
< 0), camera ids on some images only, rules needing camera ids the images lack.
``qeeps-convert-dataset`` (:mod:`.convert`) writes the built-in sets in this format.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...utils.json_files import JSON_SUFFIXES, load_json_file
from ..dataset_dicts import UNLABELED, make_image_dicts
from ..search_protocol import Gallery, Query, SearchProtocol

__all__ = [
    "FORMAT",
    "VERSION",
    "GALLERY_RULES",
    "PersonSearchFile",
    "read_person_search_file",
    "load_json_document",
    "is_person_search_path",
]

logger = logging.getLogger(__name__)

FORMAT = "qeeps-person-search"
VERSION = 1
GALLERY_RULES = ("all_other_images", "other_cameras", "explicit")
SUFFIXES = JSON_SUFFIXES
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def is_person_search_path(text: str) -> bool:
    """Whether ``text`` names a data set file (ends with .json or .json.gz) rather than a data
    set name."""
    return text.endswith(SUFFIXES)


# ------------------------------------------------------------------------------------------------
# Checking helpers: every error is "<file>: <field path>: <message>"
# ------------------------------------------------------------------------------------------------

class _Checker:
    """Raises the one-line errors of one file."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, message: str) -> ValueError:
        return ValueError(f"{self.path}: {where}: {message}" if where
                          else f"{self.path}: {message}")

    def fields(self, where: str, value: Any, required: Sequence[str],
               optional: Sequence[str] = ()) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be an object, got {_kind(value)}")
        for key in required:
            if key not in value:
                raise self.fail(where, f"missing field {key!r}")
        allowed = (*required, *optional)
        for key in value:
            if key not in allowed:
                raise self.fail(_join(where, key), "unknown field (allowed: "
                                f"{', '.join(allowed)})")
        return value

    def integer(self, where: str, value: Any, minimum: int) -> int:
        if not _is_int(value):
            raise self.fail(where, f"must be an integer, got {_short(value)}")
        if value < minimum:
            raise self.fail(where, f"must be >= {minimum}, got {value}")
        return value

    def string(self, where: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, got {_short(value)}")
        return value

    def list(self, where: str, value: Any, non_empty: bool = False) -> list:
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, got {_kind(value)}")
        if non_empty and not value:
            raise self.fail(where, "must not be empty")
        return value

    def box(self, where: str, value: Any, size: Tuple[int, int]) -> List[float]:
        """``[x1, y1, x2, y2]`` of positive size overlapping an image of ``size`` (h, w)."""
        if not isinstance(value, list) or len(value) != 4 or not all(map(_is_number, value)):
            raise self.fail(where, f"must be [x1, y1, x2, y2], 4 numbers, got {_short(value)}")
        x1, y1, x2, y2 = (float(v) for v in value)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise self.fail(where, f"holds a non-finite number: {_short(value)}")
        if x2 <= x1:
            raise self.fail(where, f"x2 ({x2:g}) <= x1 ({x1:g})")
        if y2 <= y1:
            raise self.fail(where, f"y2 ({y2:g}) <= y1 ({y1:g})")
        height, width = size
        if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
            raise self.fail(where, f"{_short(value)} lies outside its image ({width}x{height})")
        return [x1, y1, x2, y2]

    def image(self, where: str, value: Any, index: Dict[str, int]) -> int:
        if not isinstance(value, str):
            raise self.fail(where, f"must be an image name, got {_short(value)}")
        j = index.get(value)
        if j is None:
            raise self.fail(where, f"unknown image {value!r} (not in images)")
        return j


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# Parsed content
# ------------------------------------------------------------------------------------------------

@dataclass
class _GalleryLists:
    """Explicit galleries of Q queries, flattened: entries ``offsets[i]:offsets[i + 1]`` are
    query i's. ``images`` (E,) int32 image indices; ``given`` (K,) sorted entry indices whose
    target box is given explicitly, ``given_boxes`` (K, 4) (NaN rows: no target)."""

    offsets: np.ndarray
    images: np.ndarray
    given: np.ndarray
    given_boxes: np.ndarray


@dataclass
class _Protocol:
    """The ``protocol`` of a file: rule, sizes (explicit galleries, () = one list per query),
    queries (image index (Q,), boxes (Q, 4), person ids (Q,)), lists (size or None ->
    :class:`_GalleryLists`) and the pool order of size -1 (image indices)."""

    rule: str
    sizes: Tuple[int, ...]
    query_images: np.ndarray
    query_boxes: np.ndarray
    query_pids: np.ndarray
    lists: Dict[Optional[int], _GalleryLists]
    pool: np.ndarray


@dataclass
class PersonSearchFile:
    """A checked data set file.

    Attributes:
        path: the file as given (errors name it so).
        name: its ``"name"``.
        image_root: absolute folder of the images, from the file.
        file_names: N image names (relative to ``image_root``; the images' ids).
        image_sizes: (N, 2) int64 ``(height, width)``.
        box_counts: (N,) int64 boxes per image, consecutive in ``boxes``.
        boxes: (M, 4) float64 XYXY absolute pixels.
        person_ids: (M,) int64 as written (-1 unlabeled).
        camera_ids: (N,) int64, or None when the images have none.
        protocol: the search protocol, None for a training set.
    """

    path: str
    name: str
    image_root: str
    file_names: List[str]
    image_sizes: np.ndarray
    box_counts: np.ndarray
    boxes: np.ndarray
    person_ids: np.ndarray
    camera_ids: Optional[np.ndarray]
    protocol: Optional[_Protocol]
    _targets: Optional[Dict[int, Dict[int, np.ndarray]]] = field(default=None, repr=False)

    @property
    def is_test_set(self) -> bool:
        return self.protocol is not None

    # -------------------------------------------------------------------- dataset dicts, ids
    def train_person_ids(self) -> np.ndarray:
        """(M,) person ids numbered 0..N-1 in increasing order of the written ids (-1 kept)."""
        labeled = self.person_ids >= 0
        distinct = np.unique(self.person_ids[labeled])
        out = np.full(len(self.person_ids), UNLABELED, np.int64)
        out[labeled] = np.searchsorted(distinct, self.person_ids[labeled])
        return out

    def num_pids(self) -> int:
        """Distinct labeled identities of a training set (the OIM table size).

        Raises:
            ValueError: a test set (its ids are the protocol's, not numbered for training).
        """
        if self.is_test_set:
            raise ValueError(f"{self.path}: {self.name} is a test set (it has a protocol); its "
                             "person ids are not numbered for an OIM table: train on a set "
                             "without a protocol")
        return int(len(np.unique(self.person_ids[self.person_ids >= 0])))

    def dataset_dicts(self, image_root: Optional[str] = None) -> List[Dict]:
        """Detectron2 dataset dicts as the built-in loaders make them
        (:mod:`qeeps_d2.data.dataset_dicts`): ``file_name`` = image root + name, ``image_id`` =
        the name, ``camera_id`` when the images have one; training sets' ids numbered 0..N-1
        (:meth:`train_person_ids`), test sets' as written."""
        root = image_root or self.image_root
        pids = self.person_ids if self.is_test_set else self.train_person_ids()
        extra = None if self.camera_ids is None else {"camera_id": self.camera_ids.tolist()}
        dicts, past_border = make_image_dicts(
            [os.path.join(root, name) for name in self.file_names], self.image_sizes,
            self.box_counts, self.boxes, pids, extra)
        for d, name in zip(dicts, self.file_names):
            d["image_id"] = name
        if past_border:
            logger.info("%s: %d boxes extend past their image border (kept as is)", self.path,
                        past_border)
        return dicts

    # -------------------------------------------------------------------- protocol
    def protocol_info(self) -> Dict[str, Any]:
        """What :meth:`search_protocol` accepts (the ``protocol`` metadata of a test set):
        ``gallery_sizes`` (with -1, empty when sizes do not apply), ``default_gallery_size``
        (100 if listed, else the smallest; None) and ``cross_camera`` (whether the option
        applies)."""
        spec = self.protocol
        if spec is None:
            raise ValueError(f"{self.path}: {self.name} is a training set (no protocol)")
        sizes = spec.sizes + (-1,) if spec.sizes else ()
        default = (100 if 100 in spec.sizes else min(spec.sizes)) if spec.sizes else None
        return {"gallery_sizes": sizes, "default_gallery_size": default,
                "cross_camera": spec.rule == "all_other_images" and self.camera_ids is not None}

    def available_gallery_sizes(self) -> List[int]:
        """The gallery sizes :meth:`search_protocol` accepts ([] when sizes do not apply)."""
        return list(self.protocol_info()["gallery_sizes"])

    def _target_boxes(self) -> Dict[int, Dict[int, np.ndarray]]:
        """person id -> {image index: the first box of that id in the image}."""
        if self._targets is None:
            owner = np.repeat(np.arange(len(self.file_names)), self.box_counts)
            targets: Dict[int, Dict[int, np.ndarray]] = {}
            for j, pid, box in zip(owner.tolist(), self.person_ids.tolist(), self.boxes):
                if pid >= 0:
                    targets.setdefault(pid, {}).setdefault(j, box)
            self._targets = targets
        return self._targets

    def search_protocol(self, dataset: str, gallery_size: int = 100, cross_camera: bool = False,
                        image_root: Optional[str] = None) -> SearchProtocol:
        """The :class:`SearchProtocol` of a test set registered as ``dataset``.

        Args:
            gallery_size: explicit galleries with sizes: one of them or -1 (whole pool);
                ignored otherwise.
            cross_camera: ``"all_other_images"`` only (and implied by ``"other_cameras"``).
        Raises:
            ValueError: a training set, an unavailable size, cross_camera where it does not
                apply.
        """
        spec = self.protocol
        if spec is None:
            raise ValueError(f"{dataset} is a training set ({self.path} has no protocol) and "
                             "has no search protocol")
        names = self.file_names
        cameras = self.camera_ids
        queries = [Query(index=k, image=names[j], box=box.copy(), person_id=pid,
                         camera_id=-1 if cameras is None else int(cameras[j]))
                   for k, (j, box, pid) in enumerate(zip(spec.query_images.tolist(),
                                                         spec.query_boxes,
                                                         spec.query_pids.tolist()))]
        if spec.rule == "explicit":
            if cross_camera:
                raise ValueError(f"{dataset}: cross_camera does not apply to the explicit "
                                 f"galleries of {self.path}")
            if spec.sizes:
                available = self.available_gallery_sizes()
                if gallery_size not in available:
                    raise ValueError(f"{dataset}: gallery size {gallery_size!r} is not available "
                                     f"in {self.path}; available: {available}")
                name = f"{dataset}/G{gallery_size}"
                gallery_fn = (self._whole_pool(spec, queries) if gallery_size == -1
                              else self._listed(spec.lists[gallery_size], queries))
            else:
                name, gallery_fn = dataset, self._listed(spec.lists[None], queries)
        else:
            if spec.rule == "other_cameras":
                cross_camera = True
            elif cross_camera and cameras is None:
                raise ValueError(f"{dataset} has no camera ids: cross_camera needs a camera_id "
                                 f"on every image of {self.path}")
            name = dataset + ("/cross_camera" if cross_camera else "")
            gallery_fn = self._all_other(spec, queries, cross_camera)
        return SearchProtocol(name=name, dataset=dataset, queries=queries, gallery_fn=gallery_fn,
                              image_root=image_root or self.image_root)

    def _gt(self, pid: int, images: np.ndarray) -> np.ndarray:
        """(len(images), 4) target boxes of ``pid`` in each image (NaN rows where absent)."""
        gt = np.full((len(images), 4), np.nan)
        targets = self._target_boxes().get(pid)
        if targets:
            for r, j in enumerate(images.tolist()):
                box = targets.get(j)
                if box is not None:
                    gt[r] = box
        return gt

    def _listed(self, lists: _GalleryLists, queries: List[Query]):
        names = self.file_names

        def gallery(i: int) -> Gallery:
            start, stop = int(lists.offsets[i]), int(lists.offsets[i + 1])
            images = lists.images[start:stop]
            gt = self._gt(queries[i].person_id, images)
            lo, hi = np.searchsorted(lists.given, [start, stop])
            gt[lists.given[lo:hi] - start] = lists.given_boxes[lo:hi]
            return Gallery(images=[names[j] for j in images.tolist()], gt_boxes=gt)

        return gallery

    def _whole_pool(self, spec: _Protocol, queries: List[Query]):
        """CUHK-SYSU's whole pool: the smallest size's list as is, then the pool images it does
        not name, in pool order, without query i's own image, all without target."""
        listed = self._listed(spec.lists[min(spec.sizes)], queries)
        position = {j: p for p, j in enumerate(spec.pool.tolist())}
        pool_names = np.asarray([self.file_names[j] for j in spec.pool.tolist()], dtype=object)
        index = {name: j for j, name in enumerate(self.file_names)}
        query_images = spec.query_images.tolist()

        def gallery(i: int) -> Gallery:
            head = listed(i)
            keep = np.ones(len(pool_names), dtype=bool)
            drop = {index[n] for n in head.images} | {query_images[i]}
            keep[[position[j] for j in drop if j in position]] = False
            rest = pool_names[keep].tolist()
            no_target = np.full((len(rest), 4), np.nan)
            return Gallery(images=head.images + rest,
                           gt_boxes=np.concatenate([head.gt_boxes, no_target]))

        return gallery

    def _all_other(self, spec: _Protocol, queries: List[Query], cross_camera: bool):
        names = np.asarray(self.file_names, dtype=object)
        everything = np.arange(len(names))
        query_images = spec.query_images.tolist()

        def gallery(i: int) -> Gallery:
            keep = np.ones(len(names), dtype=bool)
            keep[query_images[i]] = False
            if cross_camera:
                keep &= self.camera_ids != queries[i].camera_id
            return Gallery(images=names[keep].tolist(),
                           gt_boxes=self._gt(queries[i].person_id, everything[keep]))

        return gallery


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

_CACHE: Dict[str, Tuple[Tuple[int, int], PersonSearchFile]] = {}


def load_json_document(path: str) -> Any:
    """The JSON content of ``path`` (.json or .json.gz), or a one-line error naming it."""
    return load_json_file(path, "person-search data set file")


def read_person_search_file(path: str) -> PersonSearchFile:
    """Read and check a data set file (kept in memory until the file changes on disk).

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file and the field (see the module docstring).
    """
    key = os.path.abspath(path)
    if os.path.isfile(key):
        stat = os.stat(key)
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = _CACHE.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    parsed = _parse(path, load_json_document(path))
    if os.path.isfile(key):
        _CACHE[key] = (stamp, parsed)
    return parsed


def _parse(path: str, doc: Any) -> PersonSearchFile:
    check = _Checker(path)
    if not isinstance(doc, dict):
        raise check.fail("", f"the file must hold a JSON object, got {_kind(doc)}")
    check.fields("", doc, ("format", "version", "name", "images"),
                 ("image_root", "description", "protocol"))
    if doc["format"] != FORMAT:
        raise check.fail("format", f"must be {FORMAT!r}, got {_short(doc['format'])}")
    if doc["version"] != VERSION or not _is_int(doc["version"]):
        raise check.fail("version", f"must be {VERSION} (the version this package reads), got "
                                    f"{_short(doc['version'])}")
    name = check.string("name", doc["name"])
    if not _NAME.fullmatch(name) or is_person_search_path(name):
        raise check.fail("name", f"{name!r} must be letters, digits, '_', '.', '-' (not starting "
                                 "with '_', '.', '-'; not ending with .json)")
    folder = os.path.dirname(os.path.abspath(path))
    image_root = folder
    if "image_root" in doc:
        image_root = os.path.normpath(os.path.join(folder, check.string("image_root",
                                                                        doc["image_root"])))
    if "description" in doc and not isinstance(doc["description"], str):
        raise check.fail("description", f"must be a string, got {_kind(doc['description'])}")

    names, sizes, counts, boxes, pids, cameras = _parse_images(check, doc["images"])
    protocol = None
    if "protocol" in doc:
        protocol = _parse_protocol(check, doc["protocol"], names, sizes, cameras)
    return PersonSearchFile(path=path, name=name, image_root=image_root, file_names=names,
                            image_sizes=sizes, box_counts=counts, boxes=boxes, person_ids=pids,
                            camera_ids=cameras, protocol=protocol)


def _parse_images(check: _Checker, images: Any):
    check.list("images", images, non_empty=True)
    names: List[str] = []
    first: Dict[str, int] = {}
    sizes, counts, boxes, pids = [], [], [], []
    cameras: Optional[List[int]] = None
    for i, image in enumerate(images):
        where = f"images[{i}]"
        check.fields(where, image, ("file_name", "width", "height", "boxes"), ("camera_id",))
        name = check.string(f"{where}.file_name", image["file_name"])
        if os.path.isabs(name) or os.path.normpath(name) != name or name.startswith(".."):
            raise check.fail(f"{where}.file_name", f"{name!r} must be a normalised path relative "
                                                   "to image_root")
        if name in first:
            raise check.fail(f"{where}.file_name", f"{name!r} is also images[{first[name]}]'s")
        first[name] = i
        names.append(name)
        size = (check.integer(f"{where}.height", image["height"], 1),
                check.integer(f"{where}.width", image["width"], 1))
        sizes.append(size)
        has_camera = "camera_id" in image
        if i and has_camera != (cameras is not None):
            raise check.fail(f"{where}.camera_id", (
                "missing, but images[0] has one" if cameras is not None
                else "given, but images[0] has none") + " (a camera_id on every image or none)")
        if has_camera:
            cameras = cameras if cameras is not None else []
            cameras.append(check.integer(f"{where}.camera_id", image["camera_id"], 0))
        entries = check.list(f"{where}.boxes", image["boxes"])
        counts.append(len(entries))
        for k, entry in enumerate(entries):
            at = f"{where}.boxes[{k}]"
            check.fields(at, entry, ("box", "person_id"))
            boxes.append(check.box(f"{at}.box", entry["box"], size))
            pids.append(check.integer(f"{at}.person_id", entry["person_id"], -1))
    return (names, np.asarray(sizes, np.int64).reshape(-1, 2), np.asarray(counts, np.int64),
            np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(pids, np.int64),
            None if cameras is None else np.asarray(cameras, np.int64))


def _parse_protocol(check: _Checker, protocol: Any, names: List[str], sizes: np.ndarray,
                    cameras: Optional[np.ndarray]) -> _Protocol:
    check.fields("protocol", protocol, ("gallery", "queries"), ("gallery_sizes", "pool"))
    rule = protocol["gallery"]
    if rule not in GALLERY_RULES:
        raise check.fail("protocol.gallery", f"must be one of {', '.join(GALLERY_RULES)}, got "
                                             f"{_short(rule)}")
    if rule == "other_cameras" and cameras is None:
        raise check.fail("protocol.gallery", "'other_cameras' needs a camera_id on every image; "
                                             "images[0] has none")
    gallery_sizes: Tuple[int, ...] = ()
    if "gallery_sizes" in protocol:
        if rule != "explicit":
            raise check.fail("protocol.gallery_sizes", 'only with "gallery": "explicit"')
        values = check.list("protocol.gallery_sizes", protocol["gallery_sizes"], non_empty=True)
        for k, size in enumerate(values):
            check.integer(f"protocol.gallery_sizes[{k}]", size, 1)
            if size in values[:k]:
                raise check.fail(f"protocol.gallery_sizes[{k}]", f"{size} is listed twice")
        gallery_sizes = tuple(values)
    index = {name: j for j, name in enumerate(names)}
    pool = np.arange(len(names))
    if "pool" in protocol:
        if not gallery_sizes:
            raise check.fail("protocol.pool", 'only with "gallery": "explicit" and gallery_sizes '
                                              "(it orders the whole-pool gallery, size -1)")
        values = check.list("protocol.pool", protocol["pool"])
        pool = np.asarray([check.image(f"protocol.pool[{k}]", v, index)
                           for k, v in enumerate(values)], np.int64)
        repeated = np.flatnonzero(np.bincount(pool, minlength=len(names)) > 1)
        if len(repeated):
            k = int(np.flatnonzero(pool == repeated[0])[1])
            raise check.fail(f"protocol.pool[{k}]", f"{names[repeated[0]]!r} is listed twice")

    list_key = None
    if rule == "explicit":
        list_key = "galleries" if gallery_sizes else "gallery"
    queries = check.list("protocol.queries", protocol["queries"], non_empty=True)
    builders = {size: _ListBuilder() for size in (gallery_sizes or (None,))} if list_key else {}
    q_images, q_boxes, q_pids = [], [], []
    for i, query in enumerate(queries):
        where = f"protocol.queries[{i}]"
        if isinstance(query, dict) and list_key is None:
            for key in ("gallery", "galleries"):
                if key in query:
                    raise check.fail(f"{where}.{key}", 'only with "gallery": "explicit"')
        if isinstance(query, dict) and list_key == "gallery" and "galleries" in query:
            raise check.fail(f"{where}.galleries", "only with protocol.gallery_sizes (else: "
                                                   "\"gallery\": [...])")
        if isinstance(query, dict) and list_key == "galleries" and "gallery" in query:
            raise check.fail(f"{where}.gallery", "with protocol.gallery_sizes each query lists "
                                                 "\"galleries\": {size: [...]}")
        check.fields(where, query, ("image", "box", "person_id") + ((list_key,) if list_key
                                                                      else ()), ("camera_id",))
        j = check.image(f"{where}.image", query["image"], index)
        q_images.append(j)
        q_boxes.append(check.box(f"{where}.box", query["box"], tuple(sizes[j])))
        q_pids.append(check.integer(f"{where}.person_id", query["person_id"], 0))
        if "camera_id" in query:
            camera = check.integer(f"{where}.camera_id", query["camera_id"], 0)
            if cameras is None or camera != cameras[j]:
                raise check.fail(f"{where}.camera_id", f"{camera} is not the camera of image "
                                 f"{names[j]!r} ({'none' if cameras is None else cameras[j]})")
        if list_key == "gallery":
            builders[None].add(check, f"{where}.gallery", query["gallery"], index, sizes)
        elif list_key == "galleries":
            lists = query["galleries"]
            if not isinstance(lists, dict):
                raise check.fail(f"{where}.galleries", f"must be an object size -> list, got "
                                                       f"{_kind(lists)}")
            expected = [str(size) for size in gallery_sizes]
            for key in lists:
                if key not in expected:
                    raise check.fail(f"{where}.galleries.{key}", "not a size of "
                                     f"protocol.gallery_sizes ({', '.join(expected)})")
            for size, key in zip(gallery_sizes, expected):
                if key not in lists:
                    raise check.fail(f"{where}.galleries", f"missing size {key}")
                builders[size].add(check, f"{where}.galleries.{key}", lists[key], index, sizes)
    return _Protocol(rule=rule, sizes=gallery_sizes, query_images=np.asarray(q_images, np.int64),
                     query_boxes=np.asarray(q_boxes, np.float64).reshape(-1, 4),
                     query_pids=np.asarray(q_pids, np.int64),
                     lists={size: b.build() for size, b in builders.items()}, pool=pool)


class _ListBuilder:
    """Accumulates the explicit galleries of one size, query by query."""

    def __init__(self):
        self.offsets, self.images, self.given, self.given_boxes = [0], [], [], []

    def add(self, check: _Checker, where: str, entries: Any, index: Dict[str, int],
            sizes: np.ndarray) -> None:
        check.list(where, entries)
        start = len(self.images)
        # fast path: names (most entries); objects and unknown names are looked at one by one
        found = [index.get(e, -1) if type(e) is str else -2 for e in entries]
        for k in np.flatnonzero(np.asarray(found, np.int64) < 0).tolist():
            entry, at = entries[k], f"{where}[{k}]"
            if isinstance(entry, str):
                raise check.fail(at, f"unknown image {entry!r} (not in images)")
            if not isinstance(entry, dict):
                raise check.fail(at, f"must be an image name or {{\"image\", \"box\"}}, got "
                                     f"{_short(entry)}")
            check.fields(at, entry, ("image", "box"))
            j = check.image(f"{at}.image", entry["image"], index)
            found[k] = j
            box = entry["box"]
            self.given.append(start + k)
            self.given_boxes.append([math.nan] * 4 if box is None
                                    else check.box(f"{at}.box", box, tuple(sizes[j])))
        self.images.extend(found)
        self.offsets.append(len(self.images))

    def build(self) -> _GalleryLists:
        return _GalleryLists(offsets=np.asarray(self.offsets, np.int64),
                             images=np.asarray(self.images, np.int32),
                             given=np.asarray(self.given, np.int64),
                             given_boxes=np.asarray(self.given_boxes, np.float64).reshape(-1, 4))
