"""``qeeps-convert-dataset``: write a built-in data set as a custom data set file.

::

    qeeps-convert-dataset --dataset synthps_test --out synthps_test.json
    qeeps-convert-dataset --dataset cuhk_sysu_test --out cuhk.json.gz --gallery-sizes 50,100

The file (format: :mod:`.custom`; gzip-compressed when the name ends with ``.json.gz``) holds the
data set's images and boxes as its loader reads them, ``image_root`` the absolute folder of its
images (they are not copied), and for a test set its protocol:

* CUHK-SYSU and SynthPS: ``"explicit"`` galleries, one list per gallery size whose TestG file
  exists (or those of ``--gallery-sizes``), and ``protocol.pool`` when the pool.mat order (the
  order of the whole-pool gallery, size -1) differs from the image order. An entry is written
  as an image name where the first box of the query's id in that image is its target, as
  ``{"image", "box"}`` otherwise (CUHK-SYSU lists the same image twice with two boxes, or with a
  box its Images.mat does not have), so the protocol reads back entry for entry;
* PRW and PRW-mini: ``"all_other_images"`` with the query list (camera ids on every frame: the
  cross-camera setting applies).

Registered under ``--name`` (default ``<dataset>_json``; a built-in name cannot be reused), the
file gives the same dataset dicts and protocol as the built-in name (tests/test_custom_dataset.py
checks it on small sets of each family). Training sets: their identities are numbered 0..N-1 as
the built-in loaders number them; an identity without any box (a Train.mat entry matching no
Images.mat box) would be dropped from the numbering, which is logged.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from ...utils.atomic_write import write_atomically
from ...utils.cli import ArgumentParser, UsageError, run_cli
from ..dataset_dicts import XYXY_ABS
from ..search_protocol import Gallery
from . import catalog
from .cuhk_sysu import read_test_pool  # pool.mat order: the order of the whole-pool gallery (-1)
from .custom import FORMAT, VERSION, is_person_search_path

__all__ = ["person_search_document", "write_person_search_document", "main"]

logger = logging.getLogger(__name__)


def _numbers(values) -> List[Any]:
    """Floats, integral ones as ints (shorter; read back to the same float64)."""
    return [int(v) if float(v).is_integer() else float(v) for v in values]


def _image_entry(d: Dict, image_root: str) -> Dict[str, Any]:
    name = d["image_id"]
    if d["file_name"] != os.path.join(image_root, name):
        raise ValueError(f"{d['file_name']}: not image {name!r} of the image folder {image_root}")
    entry: Dict[str, Any] = {"file_name": name, "width": int(d["width"]),
                             "height": int(d["height"])}
    if "camera_id" in d:
        entry["camera_id"] = int(d["camera_id"])
    boxes = []
    for a in d["annotations"]:
        if int(a["bbox_mode"]) != XYXY_ABS:
            raise ValueError(f"{d['file_name']}: bbox_mode {a['bbox_mode']} is not XYXY_ABS")
        boxes.append({"box": _numbers(a["bbox"]), "person_id": int(a["person_id"])})
    entry["boxes"] = boxes
    return entry


def _first_boxes(dicts: Sequence[Dict]) -> Dict[tuple, List[float]]:
    """(image name, person id) -> the first box of that id in the image (the custom loader's
    target of a gallery entry written as a name)."""
    first: Dict[tuple, List[float]] = {}
    for d in dicts:
        for a in d["annotations"]:
            if a["person_id"] >= 0:
                first.setdefault((d["image_id"], a["person_id"]), a["bbox"])
    return first


def _entries(gallery: Gallery, person_id: int, first: Dict[tuple, List[float]]) -> List[Any]:
    """Gallery entries: a name where the loader finds the same target, else image and box."""
    out: List[Any] = []
    for name, gt in zip(gallery.images, gallery.gt_boxes):
        found = first.get((name, person_id))
        missing = bool(np.isnan(gt[0]))
        if (found is None and missing) or (found is not None and not missing
                                           and np.array_equal(found, gt)):
            out.append(name)
        else:
            out.append({"image": name, "box": None if missing else _numbers(gt)})
    return out


def _query_entry(query) -> Dict[str, Any]:
    entry = {"image": query.image, "box": _numbers(query.box), "person_id": int(query.person_id)}
    if query.camera_id >= 0:
        entry["camera_id"] = int(query.camera_id)
    return entry


def _explicit_protocol(dataset: str, dicts: Sequence[Dict], gallery_sizes, progress: bool):
    available = [s for s in catalog.available_gallery_sizes(dataset) if s != -1]
    sizes = list(gallery_sizes) if gallery_sizes else available
    wrong = [s for s in sizes if s not in available]
    if wrong:
        raise UsageError(f"--gallery-sizes: {dataset} has no gallery size {wrong[0]}; "
                         f"available: {available}")
    if min(sizes) != min(available):
        logger.warning("%s: without gallery size %d the whole-pool gallery (-1) of the file starts "
                       "with the G%d lists, not the G%d ones as the built-in's", dataset,
                       min(available), min(sizes), min(available))
    protocols = {size: catalog.load_protocol(dataset, size) for size in sizes}
    base = protocols[sizes[0]]
    first = _first_boxes(dicts)
    queries = []
    for i, query in enumerate(tqdm(base.queries, desc=f"{dataset} galleries", unit="query",
                                   disable=not progress)):
        entry = _query_entry(query)
        entry["galleries"] = {str(size): _entries(protocols[size].gallery(i), query.person_id,
                                                  first) for size in sizes}
        queries.append(entry)
    doc: Dict[str, Any] = {"gallery": "explicit", "gallery_sizes": sizes}
    pool = read_test_pool(catalog.dataset_root(dataset))
    if pool != [d["image_id"] for d in dicts]:
        doc["pool"] = pool
    doc["queries"] = queries
    return doc


def person_search_document(dataset: str, name: Optional[str] = None,
                           gallery_sizes: Optional[Sequence[int]] = None,
                           progress: bool = False) -> Dict[str, Any]:
    """The custom-format document (a JSON-ready dict) of built-in data set ``dataset``.

    Args:
        name: the document's ``"name"`` (default ``<dataset>_json``).
        gallery_sizes: CUHK-SYSU style test sets: the sizes to write (default: all whose TestG
            file exists).
        progress: show a progress bar over the queries.
    Raises:
        ValueError / FileNotFoundError: unknown or custom data set, data set files missing or
            malformed, an unavailable gallery size.
    """
    if dataset not in catalog.DATASET_NAMES:
        raise UsageError(f"--dataset: {dataset!r} is not a built-in data set; built in: "
                         f"{', '.join(catalog.DATASET_NAMES)}")
    dicts = catalog.load_dataset_dicts(dataset)
    image_root = catalog.image_root(dataset)
    doc: Dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "name": name or f"{dataset}_json",
        "description": f"{dataset}, converted by qeeps-convert-dataset",
        "image_root": image_root,
        "images": [_image_entry(d, image_root) for d in dicts],
    }
    if not catalog.is_test_set(dataset):
        labeled = {a["person_id"] for d in dicts for a in d["annotations"] if a["person_id"] >= 0}
        total = catalog.num_pids(dataset)
        if len(labeled) != total:
            logger.warning("%s: %d of its %d identities have boxes; the converted set numbers "
                           "those %d 0..%d (its OIM table has %d rows)", dataset, len(labeled),
                           total, len(labeled), len(labeled) - 1, len(labeled))
        return doc
    if catalog.protocol_info(dataset)["gallery_sizes"]:
        doc["protocol"] = _explicit_protocol(dataset, dicts, gallery_sizes, progress)
    else:
        if gallery_sizes:
            raise UsageError(f"--gallery-sizes: {dataset} has no gallery sizes")
        protocol = catalog.load_protocol(dataset)
        doc["protocol"] = {"gallery": "all_other_images",
                           "queries": [_query_entry(q) for q in protocol.queries]}
    return doc


def write_person_search_document(path: str, doc: Dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` (.json, or gzip .json.gz), atomically."""
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".gz"):
        write_atomically(path, lambda f: f.write(gzip.compress(text, compresslevel=6)))
    else:
        write_atomically(path, lambda f: f.write(text))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # the temporary file was private (0600)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qeeps-convert-dataset",
                       description="Write a built-in person-search data set as a custom data set "
                                   "file (qeeps_d2/data/datasets/custom.py format).")
    p.add_argument("--dataset", required=True, help="built-in data set: "
                   + ", ".join(catalog.DATASET_NAMES))
    p.add_argument("--output", "--out", dest="out", required=True,
                   help="output file (.json or .json.gz)")
    p.add_argument("--name", help="data set name in the file (default <dataset>_json)")
    p.add_argument("--gallery-sizes", help="CUHK-SYSU style test sets: comma-separated sizes "
                   "to write (default: every size whose TestG file exists)")
    return p


def _run(args) -> List[str]:
    if not is_person_search_path(args.out):
        raise UsageError(f"--out {args.out}: must end with .json or .json.gz")
    sizes = None
    if args.gallery_sizes:
        try:
            sizes = [int(v) for v in args.gallery_sizes.split(",")]
        except ValueError:
            raise UsageError(f"--gallery-sizes {args.gallery_sizes}: comma-separated integers, "
                             "e.g. 50,100") from None
    start = time.perf_counter()
    doc = person_search_document(args.dataset, args.name, sizes, progress=True)
    write_person_search_document(args.out, doc)
    # the written file must read back (its name valid, its boxes inside their images)
    from .custom import read_person_search_file

    data = read_person_search_file(args.out)
    what = "training set" if data.protocol is None else (
        f"{len(data.protocol.query_pids)} queries, {data.protocol.rule} galleries"
        + (f" G{','.join(map(str, data.protocol.sizes))}" if data.protocol.sizes else ""))
    return [f"{args.out}: {data.name} ({args.dataset}), {len(data.file_names)} images, "
            f"{len(data.boxes)} boxes, {what}; {os.path.getsize(args.out) / 1e6:.1f} MB in "
            f"{time.perf_counter() - start:.1f} s"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``qeeps-convert-dataset``; returns the exit status (0 ok, 2 user error)."""
    return run_cli("qeeps-convert-dataset", _parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
