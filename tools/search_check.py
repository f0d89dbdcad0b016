#!/usr/bin/env python
"""Does ``qeeps-search`` find a SynthPS test identity among unrelated images? (issue #6's check)

For each of the first ``--queries`` queries of ``synthps_test`` (gallery 50 protocol) it builds a
gallery folder from the images holding the query person (the protocol's positives) and
``--distractors`` images of the same gallery list that do not, runs the ``qeeps-search`` command
line on it (``--topk 5``), and counts a hit when one of the 5 matches is the query person (IoU >=
0.5 with the person's ground-truth box in that image).

    python tools/search_check.py --config configs/SynthPS/oim.yaml \\
        --weights output/demo/oim/model_final.pth --queries 20 --out output/search_check

Prints one line per query and the hit count; writes ``OUT/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np


def main(argv=None) -> int:
    from qeeps_d2.utils.cli import add_model_arguments, add_output_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, confidence=False, opts=False, device=False)
    parser.add_argument("--queries", type=int, default=20, help="first N queries of synthps_test")
    parser.add_argument("--distractors", type=int, default=20, help="unrelated images per gallery")
    add_output_argument(parser, "output/search_check")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cascade-topk", type=int, default=0, help="passed to qeeps-search")
    args = parser.parse_args(argv)

    from qeeps_d2.data.datasets.catalog import image_root, load_protocol
    from qeeps_d2.evaluation.box_iou import box_iou

    protocol = load_protocol("synthps_test", 50)
    images = image_root("synthps_test")
    rows = []
    for query in protocol.queries[: args.queries]:
        gallery = protocol.gallery(query.index)
        positive = ~np.isnan(gallery.gt_boxes[:, 0])
        truth = {name: box for name, box, p in zip(gallery.images, gallery.gt_boxes, positive) if p}
        chosen = list(truth) + [n for n, p in zip(gallery.images, positive) if not p][: args.distractors]
        folder = os.path.join(args.output, f"q{query.index:03d}", "gallery")
        shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
        os.makedirs(folder)
        for name in chosen:
            shutil.copy(os.path.join(images, name), folder)
        result_dir = os.path.join(args.output, f"q{query.index:03d}", "search")
        box = ",".join(f"{v:.1f}" for v in query.box)
        cmd = [sys.executable, "-m", "qeeps_d2.search.cli", "--config", args.config_file,
               "--weights", args.weights, "--query", os.path.join(images, query.image),
               "--box", box, "--gallery", folder, "--topk", "5", "--out", result_dir,
               "--device", args.device, "--cascade-topk", str(args.cascade_topk)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"qeeps-search failed on query {query.index} (exit {done.returncode})")
        with open(os.path.join(result_dir, "results.json")) as f:
            matches = json.load(f)["matches"]
        ranks = [m["rank"] for m in matches
                 if m["frame"] in truth
                 and box_iou(np.asarray(m["box"]), truth[m["frame"]]) >= 0.5]
        rows.append({"query": query.index, "image": query.image, "positives": len(truth),
                     "gallery": len(chosen), "hit_ranks": ranks})
        print(f"query {query.index:3d} ({query.image}): {len(truth)} positive images among "
              f"{len(chosen)}; {'hit at rank ' + str(ranks[0]) if ranks else 'no hit'} in the top 5",
              flush=True)
    hits = sum(bool(r["hit_ranks"]) for r in rows)
    top1 = sum(bool(r["hit_ranks"]) and r["hit_ranks"][0] == 1 for r in rows)
    print(f"{hits} of {len(rows)} queries found in the top 5 ({top1} at rank 1)")
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump({"config": args.config_file, "weights": args.weights, "hits_top5": hits,
                   "hits_top1": top1, "queries": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
