"""``qeeps-convert-results``: a results file as COCO detections and as per-query top-k lists.

::

    qeeps-convert-results RESULTS [--coco DETECTIONS.json] [--coco-gt GT.json]
                          [--image-ids IDS.json] [--topk LISTS.json] [--k 10]
                          [--dataset NAME|FILE.json] [--gallery-size 100] [--cross-camera]
                          [--det-thresh T]

**COCO detections** (``--coco``): the list that ``pycocotools``' ``COCO.loadRes`` and
Detectron2's COCO evaluation read, one entry per detection::

    [{"image_id": 7, "category_id": 1, "bbox": [x, y, w, h], "score": det_score}, ...]

A results file stores detections per query; the gallery detections are its query-independent
``gallery_detections`` when it holds them (query-agnostic models), else the rows of every
query's entries with each detection (box and detection score) kept once per image. For
query-guided models that union is not one detector's output (each query has its own boxes):
detection AP from it mixes the queries. ``--det-thresh`` (default 0: every row of the file)
drops detections below it. Image ids: by default the data set's own image order, the 1-based
position of an image among the data set's dicts (``load_dataset_dicts``, the order
``DatasetCatalog`` gives); ``--coco-gt GT.json`` writes the data set's ground truth as a COCO
file with those ids (every person, labeled or not, category 1 "person", ``person_id`` kept).
``--image-ids IDS.json`` takes the ids of an existing COCO file instead (its ``images``:
``{"id", "file_name"}``, matched by base name) or of a plain ``{"s1.jpg": 1, ...}`` object.

**Top-k lists** (``--topk``, ``--k``, default 10): per query, its k best gallery detections
ranked as the protocol ranks them (``det_score >= --det-thresh``, default 0.5 here, like the
protocol; :func:`qeeps_d2.evaluation.ranking.rank_query`), in the layout that SeqNet's and
COAT's ``eval_search_cuhk`` / ``eval_search_prw`` dump for their visualisation
(``{"image_root", "results": [{"query_img", "query_roi", "query_gt", "gallery": [{"img",
"roi", "score", "correct"}]}]}``, ``roi`` of a gallery entry holding ``[x1, y1, x2, y2,
det_score]``, ``score`` the similarity), with a few fields added::

    {"image_root": "<images folder>", "dataset": ..., "protocol": ..., "k": 10,
     "det_thresh": 0.5,
     "results": [{"query_img": "s103.jpg", "query_roi": [x1, y1, x2, y2],
                  "query_index": 0, "query_pid": 0,
                  "query_gt": [{"img": "s398.jpg", "roi": [x1, y1, x2, y2]}, ...],
                  "gallery": [{"img": "s398.jpg", "roi": [x1, y1, x2, y2, det_score],
                               "score": similarity, "correct": 1, "det_score": det_score},
                              ...]}]}

Unlike SeqNet's CUHK-SYSU dump (which keeps only queries whose top-1 is wrong and exactly 10
entries), every query of the file is written, with at most k entries. Boxes are XYXY pixels of
the original image throughout. ``--dataset`` is the results file's data set by default; a
custom data set file (``.json`` / ``.json.gz``, :mod:`qeeps_d2.data.datasets.custom`) is put
into the catalog under the name it holds, as ``qeeps-eval`` does. User errors print one line
and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..data.dataset_dicts import XYWH_ABS, XYXY_ABS
from ..data.datasets.catalog import add_person_search_file, load_dataset_dicts, load_protocol
from ..data.datasets.custom import is_person_search_path, read_person_search_file
from ..data.search_protocol import SearchProtocol
from ..utils.cli import ArgumentParser, UsageError, add_protocol_arguments, run_cli
from .ranking import rank_query
from .results_file import SearchResults, read_results, validate_against_protocol

__all__ = [
    "coco_detections",
    "coco_ground_truth",
    "dataset_image_ids",
    "gallery_detections",
    "main",
    "read_image_ids",
    "topk_lists",
]

PERSON_CATEGORY = 1


def gallery_detections(results: SearchResults) -> Dict[str, np.ndarray]:
    """The file's gallery detections, each once per image (module docstring).

    Returns:
        image name -> (N, 5) float64 ``[x1, y1, x2, y2, det_score]``, by descending score;
        the file's ``gallery_detections`` when present, else the union of every query's rows.
    """
    per_image: Dict[str, List[np.ndarray]] = {}
    if results.gallery_detections is not None:
        per_image = {name: [rows] for name, rows in results.gallery_detections.items()}
    else:
        for q in results.queries:
            for name, rows in q.gallery.items():
                per_image.setdefault(name, []).append(rows[:, :5])
    out = {}
    for name in sorted(per_image):
        rows = np.unique(np.concatenate(per_image[name]).reshape(-1, 5), axis=0)
        out[name] = rows[np.argsort(-rows[:, 4], kind="stable")]
    return out


def dataset_image_ids(dataset_dicts: Sequence[Mapping]) -> Dict[str, int]:
    """The data set's image ids: image name -> 1-based position among its dicts."""
    return {d["image_id"]: i + 1 for i, d in enumerate(dataset_dicts)}


def read_image_ids(path: str) -> Dict[str, int]:
    """Image name -> id from a COCO file (``images``: ``{"id", "file_name"}``, matched by base
    name) or a plain ``{"name": id}`` object.

    Raises:
        FileNotFoundError / ValueError naming the file and the problem.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image-id file not found")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if isinstance(doc, dict) and isinstance(doc.get("images"), list):
        pairs = []
        for k, image in enumerate(doc["images"]):
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                raise ValueError(f"{path}: images[{k}] must hold id and file_name")
            pairs.append((os.path.basename(str(image["file_name"])), image["id"]))
    elif isinstance(doc, dict):
        pairs = list(doc.items())
    else:
        raise ValueError(f"{path}: expected a COCO file with 'images' or an object name -> id")
    ids: Dict[str, int] = {}
    for name, image_id in pairs:
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise ValueError(f"{path}: the id of {name!r} must be an integer, got {image_id!r}")
        if name in ids and ids[name] != image_id:
            raise ValueError(f"{path}: image {name!r} has two ids, {ids[name]} and {image_id}")
        ids[name] = image_id
    return ids


def coco_detections(detections: Mapping[str, np.ndarray], image_ids: Mapping[str, int],
                    det_thresh: float = 0.0, source: str = "results") -> List[Dict[str, Any]]:
    """COCO detection results of ``detections`` (image -> (N, >=5) XYXY + score rows).

    Raises:
        ValueError: an image without an id (names ``source`` and the image).
    """
    out = []
    for name, rows in detections.items():
        if name not in image_ids:
            raise ValueError(f"{source}: image {name!r} has no image id (not in the data set, "
                             "or missing from --image-ids)")
        for x1, y1, x2, y2, score in np.asarray(rows, np.float64)[:, :5].tolist():
            if score >= det_thresh:
                out.append({"image_id": image_ids[name], "category_id": PERSON_CATEGORY,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return out


def coco_ground_truth(dataset_dicts: Sequence[Mapping], image_ids: Mapping[str, int]
                      ) -> Dict[str, Any]:
    """The data set's person boxes as a COCO ground-truth file (images with ``image_ids``;
    every person, labeled or not, category 1; ``person_id`` kept, -1 unlabeled).

    Raises:
        ValueError: an image of the data set without an id.
    """
    images, annotations = [], []
    for d in dataset_dicts:
        name = d["image_id"]
        if name not in image_ids:
            raise ValueError(f"image {name!r} of the data set has no image id")
        images.append({"id": image_ids[name], "file_name": name, "height": int(d["height"]),
                       "width": int(d["width"])})
        for a in d.get("annotations", []):
            x1, y1, x2, y2 = (float(v) for v in a["bbox"])
            if int(a.get("bbox_mode", XYXY_ABS)) == XYWH_ABS:
                x2, y2 = x1 + x2, y1 + y2
            annotations.append({"id": len(annotations) + 1, "image_id": image_ids[name],
                                "category_id": PERSON_CATEGORY,
                                "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                                "person_id": int(a.get("person_id", -1))})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": PERSON_CATEGORY, "name": "person"}]}


def topk_lists(results: SearchResults, protocol: SearchProtocol, k: int = 10,
               det_thresh: float = 0.5) -> Dict[str, Any]:
    """Per query of ``results``, its ``k`` best gallery detections (module docstring layout).

    ``results`` must fit ``protocol`` (:func:`validate_against_protocol`).
    """
    entries = []
    for q in sorted(results.queries, key=lambda q: q.index):
        query, gallery = protocol.queries[q.index], protocol.gallery(q.index)
        ranked = rank_query(gallery, q.gallery, det_thresh).top(k)
        positives = dict.fromkeys(
            (name, tuple(box.tolist())) for name, box in zip(gallery.images, gallery.gt_boxes)
            if not np.isnan(box[0]))
        entries.append({
            "query_img": query.image, "query_roi": query.box.tolist(),
            "query_index": q.index, "query_pid": int(query.person_id),
            "query_gt": [{"img": name, "roi": list(box)} for name, box in positives],
            "gallery": [{"img": name, "roi": row[:5].tolist(), "score": float(row[5]),
                         "correct": int(ok), "det_score": float(row[4])}
                        for name, row, ok in zip(ranked.images, ranked.rows, ranked.correct)],
        })
    return {"image_root": protocol.image_root, "dataset": protocol.dataset,
            "protocol": protocol.name, "k": k, "det_thresh": det_thresh, "results": entries}


def _write_json(path: str, doc: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"))


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qeeps-convert-results",
                       description="Export a person-search results file as COCO detections "
                                   "and / or per-query top-k lists (SeqNet layout).")
    p.add_argument("results", metavar="RESULTS", help="results file (.json or .json.gz)")
    p.add_argument("--coco", metavar="FILE", help="write COCO-format detection results here")
    p.add_argument("--coco-gt", metavar="FILE",
                   help="write the data set's ground truth as a COCO file (same image ids)")
    p.add_argument("--image-ids", metavar="FILE",
                   help="image ids from this COCO file (or {name: id} object); default: the "
                        "data set's image order, 1-based")
    p.add_argument("--topk", metavar="FILE", help="write per-query top-k lists here")
    p.add_argument("--k", type=int, default=10, help="entries per query in --topk (default 10)")
    add_protocol_arguments(
        p, det_thresh=None, scope="--topk protocol: ",
        det_thresh_help="keep detections with det_score >= this (default: 0 for --coco, 0.5, "
                        "the protocol's, for --topk)")
    return p


def _run(args) -> List[str]:
    if not (args.coco or args.coco_gt or args.topk):
        raise UsageError("nothing to write: give --coco, --coco-gt and / or --topk")
    if args.k < 1:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    if args.det_thresh is not None and args.det_thresh < 0:
        raise UsageError(f"--det-thresh must be >= 0, got {args.det_thresh}")
    dataset = args.dataset
    if dataset is not None and is_person_search_path(dataset):  # numpy only: catalog, not D2
        dataset = read_person_search_file(args.dataset).name
        add_person_search_file(dataset, args.dataset)
    results = read_results(args.results)
    dataset = dataset or results.dataset
    if results.dataset != dataset:
        raise ValueError(f"{args.results}: results are for data set {results.dataset!r}, not "
                         f"{dataset!r} (--dataset)")
    lines = []
    if args.coco or args.coco_gt:
        dicts = load_dataset_dicts(dataset)
        ids = read_image_ids(args.image_ids) if args.image_ids else dataset_image_ids(dicts)
        origin = args.image_ids or f"the order of {dataset}'s images"
        if args.coco:
            detections = gallery_detections(results)
            coco = coco_detections(detections, ids, args.det_thresh or 0.0, args.results)
            _write_json(args.coco, coco)
            source = ("gallery_detections" if results.gallery_detections is not None
                      else "the queries' rows")
            lines.append(f"{args.coco}: {len(coco)} detections of {len(detections)} images "
                         f"(from {source}; image ids: {origin})")
        if args.coco_gt:
            gt = coco_ground_truth(dicts, ids)
            _write_json(args.coco_gt, gt)
            lines.append(f"{args.coco_gt}: {len(gt['annotations'])} persons in "
                         f"{len(gt['images'])} images of {dataset} (image ids: {origin})")
    if args.topk:
        protocol = load_protocol(dataset, args.gallery_size, args.cross_camera)
        validate_against_protocol(results, protocol, args.results)
        thresh = 0.5 if args.det_thresh is None else args.det_thresh
        lists = topk_lists(results, protocol, args.k, thresh)
        _write_json(args.topk, lists)
        lines.append(f"{args.topk}: top-{args.k} lists of {len(lists['results'])} queries "
                     f"({protocol.name}, det_thresh {thresh:g})")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``qeeps-convert-results``; returns the exit status (0 ok, 2 user error)."""
    return run_cli("qeeps-convert-results", _parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
