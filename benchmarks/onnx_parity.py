#!/usr/bin/env python
"""Parity and speed of an ONNX export (``qeeps-export-onnx``) against the PyTorch model.

On the first ``--num-images`` gallery images of a registered test set (default
``synthps_test``), each optionally rescaled by ``--scales`` (1.0 = as stored; another factor
makes the test resize and the rescaling of the boxes do work), runs

- PyTorch: the model on ``PersonSearchMapper`` inputs (what ``qeeps-search`` runs), detections
  with score >= ``DET_THRESH``; each image's annotated boxes as query boxes (``query_embed``);
- onnxruntime: :class:`qeeps_d2.search.onnx_backend.OnnxFrameEmbedder` ``embed_frames`` and
  ``embed_query`` on the same BGR pixels,

and prints/writes: images whose detection counts agree, max / mean |box difference| (px, over
the coordinates of matched detections), max |score difference|, min cosine between matched
embeddings, min cosine of the query embeddings, and the median seconds per image of each
(``--runs`` timed passes after one warm-up, PyTorch and onnxruntime interleaved image by image,
both with ``--threads`` threads; PyTorch times ``model([input])`` on the mapped input,
onnxruntime ``embed_frames`` including its resize)::

    python benchmarks/onnx_parity.py --config-file configs/SynthPS/oim.yaml \\
        --weights output/demo/oim/model_final.pth --onnx output/oim.onnx \\
        [--export] [--first-stage] [--num-images 50] [--scales 1.0 1.6] [--threads 2] [--runs 3] \\
        [--json output/onnx_parity.json]

``--export`` (or a missing ``--onnx`` file) exports the model first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from qeeps_d2.utils.json_files import write_json_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4), (M, 4) XYXY -> (N, M) IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_detections(boxes_a: np.ndarray, boxes_b: np.ndarray, min_iou: float = 0.5):
    """Pairs (i, j) of detections: in order when the counts agree and every pair overlaps
    (IoU >= 0.99), else greedily by IoU (>= ``min_iou``)."""
    if len(boxes_a) == len(boxes_b) and len(boxes_a):
        if (np.diag(_iou(boxes_a, boxes_b)) >= 0.99).all():
            return [(i, i) for i in range(len(boxes_a))]
    if not len(boxes_a) or not len(boxes_b):
        return []
    iou = _iou(boxes_a, boxes_b)
    pairs = []
    while True:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        if iou[i, j] < min_iou:
            return pairs
        pairs.append((int(i), int(j)))
        iou[i, :] = -1
        iou[:, j] = -1


def _rescaled(image: np.ndarray, boxes: np.ndarray, scale: float):
    import cv2

    if scale == 1.0:
        return image, boxes
    h, w = image.shape[:2]
    size = (int(round(w * scale)), int(round(h * scale)))
    out = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return out, boxes * np.array([size[0] / w, size[1] / h] * 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--onnx", required=True, help="the exported file (exported if missing)")
    p.add_argument("--export", action="store_true", help="(re-)export it first")
    p.add_argument("--first-stage", action="store_true",
                   help="a query-guided model: its query-agnostic first stage")
    p.add_argument("--dataset", default="synthps_test")
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.6])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", default="output/onnx_parity.json")
    args = p.parse_args(argv)

    import tempfile

    import cv2
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils

    import qeeps_d2  # noqa: F401  (registers the data sets)
    from qeeps_d2.data.mapper import PersonSearchMapper
    from qeeps_d2.export import export_onnx, load_export_model
    from qeeps_d2.search.onnx_backend import OnnxFrameEmbedder

    torch.set_num_threads(args.threads)
    cfg, model = load_export_model(args.config_file, args.weights, first_stage=args.first_stage)
    if args.export or not os.path.isfile(args.onnx):
        t0 = time.perf_counter()
        meta = export_onnx(cfg, model, args.onnx, config_file=args.config_file,
                           weights=args.weights, first_stage=args.first_stage)
        print(f"exported {args.onnx} in {time.perf_counter() - t0:.1f} s; check "
              f"{meta['check']}")
    embedder = OnnxFrameEmbedder(args.onnx, threads=args.threads)
    det_thresh = float(cfg.TEST.PERSON_SEARCH.DET_THRESH)
    mapper = PersonSearchMapper(cfg, is_train=False)
    records = DatasetCatalog.get(args.dataset)[: args.num_images]
    tmp = tempfile.mkdtemp(prefix="onnx_parity_")
    report = {"command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
              "config": args.config_file, "weights": args.weights, "onnx": args.onnx,
              "dataset": args.dataset, "images": len(records), "threads": args.threads,
              "runs": args.runs, "det_thresh": det_thresh, "cpu_count": os.cpu_count(),
              "load_average_start": list(os.getloadavg()), "scales": {}}
    for scale in args.scales:
        inputs = []  # (BGR image, PyTorch gallery input, PyTorch query inputs, query boxes)
        for k, r in enumerate(records):
            image = utils.read_image(r["file_name"], format="BGR")
            boxes = np.array([a["bbox"] for a in r.get("annotations", [])], dtype=np.float64)
            image, boxes = _rescaled(image, boxes.reshape(-1, 4), scale)
            path = os.path.join(tmp, f"{k}.png")  # lossless: both read the same pixels
            cv2.imwrite(path, image)
            gallery = mapper({"file_name": path})
            queries = [mapper({"file_name": path, "query_box": b.tolist()}) for b in boxes]
            inputs.append((image, gallery, queries, boxes))

        counts_agree, box_diffs, score_diffs, cosines, query_cos, matched, total = 0, [], [], [], [], 0, 0
        with torch.no_grad():
            for image, gallery, queries, boxes in inputs:
                inst = model([gallery])[0]["instances"]
                inst = inst[inst.scores >= det_thresh]
                tb, ts, te = (inst.pred_boxes.tensor.numpy(), inst.scores.numpy(),
                              inst.pred_embeds.numpy())
                found = embedder.embed_frames([image])[0]
                counts_agree += int(len(found) == len(tb))
                total += len(tb)
                for i, j in match_detections(tb, found.boxes):
                    matched += 1
                    box_diffs.extend(np.abs(tb[i] - found.boxes[j]).tolist())
                    score_diffs.append(abs(float(ts[i] - found.scores[j])))
                    cosines.append(float(te[i] @ found.embeddings[j]))
                for q, b in zip(queries, boxes):
                    want = model([q])[0]["query_embed"].numpy()
                    got = embedder.embed_query(image, b)
                    query_cos.append(float(want @ got))
            # speed: one warm-up pass, then ``runs`` passes, interleaved image by image
            times_pt, times_ort = [], []
            for run in range(args.runs + 1):
                for image, gallery, _, _ in inputs:
                    t0 = time.perf_counter()
                    model([gallery])
                    t1 = time.perf_counter()
                    embedder.embed_frames([image])
                    t2 = time.perf_counter()
                    if run:
                        times_pt.append(t1 - t0)
                        times_ort.append(t2 - t1)
        row = {
            "input_size": list(inputs[0][0].shape[:2]),
            "images_with_equal_counts": counts_agree,
            "detections_pytorch": total,
            "detections_matched": matched,
            "max_abs_box_diff_px": max(box_diffs, default=0.0),
            "mean_abs_box_diff_px": float(np.mean(box_diffs)) if box_diffs else 0.0,
            "max_abs_score_diff": max(score_diffs, default=0.0),
            "min_embedding_cosine": min(cosines, default=1.0),
            "queries": len(query_cos),
            "min_query_embedding_cosine": min(query_cos, default=1.0),
            "median_s_per_image_pytorch": statistics.median(times_pt),
            "median_s_per_image_onnxruntime": statistics.median(times_ort),
        }
        row["speedup"] = row["median_s_per_image_pytorch"] / row["median_s_per_image_onnxruntime"]
        report["scales"][str(scale)] = row
        print(f"scale {scale} ({row['input_size'][0]}x{row['input_size'][1]}, {len(inputs)} "
              f"images): counts agree on {counts_agree}/{len(inputs)}, {matched}/{total} "
              f"detections matched; |box diff| max {row['max_abs_box_diff_px']:.2e} px, mean "
              f"{row['mean_abs_box_diff_px']:.2e} px; |score diff| max "
              f"{row['max_abs_score_diff']:.2e}; min cosine {row['min_embedding_cosine']:.7f} "
              f"(queries: {row['min_query_embedding_cosine']:.7f}, {len(query_cos)}); "
              f"median s/image PyTorch {row['median_s_per_image_pytorch']:.4f}, onnxruntime "
              f"{row['median_s_per_image_onnxruntime']:.4f} (x{row['speedup']:.2f}, "
              f"{args.threads} thread{'s' if args.threads > 1 else ''})")
    report["load_average_end"] = list(os.getloadavg())
    print(f"load average (1, 5, 15 min) at the start {report['load_average_start']}, at the end "
          f"{report['load_average_end']} on {os.cpu_count()} CPUs")
    if args.json:
        write_json_file(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
