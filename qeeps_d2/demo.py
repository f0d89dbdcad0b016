"""``make demo``: SynthPS end to end, OIM baseline vs QEEPS, with a visual report.

    python -m qeeps_d2.demo [--out output/demo] [--queries 8] [KEY VALUE ...]

1. generates SynthPS (``$DETECTRON2_DATASETS/synthps``) if it is not there;
2. pretrains the trunk on the identities of another SynthPS seed (the stand-in for the paper's
   ImageNet start, :mod:`qeeps_d2.engine.pretrain`; skipped when ``<out>/pretrain`` holds it);
3. trains the OIM baseline from it (``configs/SynthPS/oim.yaml``), then QEEPS from the OIM model
   (``configs/SynthPS/qeeps.yaml``) - each skipped when its ``model_final.pth`` exists and
   resumed from its last checkpoint after an interruption;
4. evaluates both on ``synthps_test`` (gallery 100, and gallery 50 scored from the same run);
5. prints the side-by-side table and writes ``<out>/report.html`` with the results viewer
   (:mod:`qeeps_d2.viewer`): per sampled query, the query and the top-5 matches of each model,
   right (green) and wrong (red) marked, and a sortable table of every query's AP and top-1.

Runs on the GPU when one is present (the configs' default device), else on the CPU.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["main", "top_matches"]

logger = logging.getLogger("qeeps_d2.demo")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GALLERY_SIZES = (50, 100)
MODELS = (("OIM", "configs/SynthPS/oim.yaml"), ("QEEPS", "configs/SynthPS/qeeps.yaml"))


def _say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def top_matches(gallery, detections: Dict[str, np.ndarray], k: int = 5, det_thresh: float = 0.5):
    """The k best detections of one query over its gallery, ranked by similarity.

    Args:
        gallery: the query's :class:`~qeeps_d2.data.search_protocol.Gallery`.
        detections: image -> (N, 6) rows [x1, y1, x2, y2, det_score, similarity].
    Returns:
        list of (image name, box (4,), det_score, similarity, correct) where ``correct`` is
        True when the box is the protocol's true positive for the query person (its IoU rule,
        one per gallery image; :func:`qeeps_d2.evaluation.ranking.rank_query`, the ranking the
        results viewer shows).
    """
    from qeeps_d2.evaluation.ranking import rank_query

    ranked = rank_query(gallery, detections, det_thresh).top(k)
    return [(name, r[:4], float(r[4]), float(r[5]), bool(ok))
            for name, r, ok in zip(ranked.images, ranked.rows, ranked.correct)]


def top1_similarities(protocol, detections: Dict[int, Dict[str, np.ndarray]],
                      det_thresh: float = 0.5) -> Dict[str, List[float]]:
    """The similarity of each query's top-1 match, split by whether it is the query person:
    {"right": [...], "wrong": [...]} (queries without any detection are left out). A collapsed
    embedding shows as right and wrong matches of the same, near-1 similarity."""
    out = {"right": [], "wrong": []}
    for q, dets in detections.items():
        found = top_matches(protocol.gallery(q), dets, k=1, det_thresh=det_thresh)
        if found:
            out["right" if found[0][4] else "wrong"].append(found[0][3])
    return out


def format_similarities(label: str, sims: Dict[str, List[float]]) -> str:
    """One line: mean (and count) of right and wrong top-1 similarities."""
    parts = []
    for kind in ("right", "wrong"):
        v = sims[kind]
        parts.append(f"{kind} {np.mean(v):.3f} ({len(v)})" if v else f"{kind} - (0)")
    return f"{label}: mean top-1 similarity at gallery 100: " + ", ".join(parts)


def _report(out_dir: str, rows: Sequence[Dict], num_queries: int, seed: int = 0) -> str:
    """Write ``<out_dir>/report.html`` with the results viewer (:mod:`qeeps_d2.viewer`): per
    sampled query, both models' top-5 matches side by side, and the table of every query."""
    from qeeps_d2.viewer import QuerySelection, build_viewer

    selection = (QuerySelection(sample=num_queries, seed=seed) if num_queries > 0
                 else QuerySelection(queries=[]))
    report = build_viewer(
        [r["results"] for r in rows], out_dir, labels=[label for label, _ in MODELS],
        dataset="synthps_test", gallery_size=max(GALLERY_SIZES), topk=5,
        selection=selection, page_name="report.html",
        image_folder="report_images", title="QEEPS-D2 demo on SynthPS: OIM vs QEEPS")
    return report.page


def _table(rows: List[Dict]) -> str:
    from qeeps_d2.engine.experiments import format_table

    return format_table(rows, GALLERY_SIZES)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="QEEPS-D2 demo: SynthPS, OIM vs QEEPS")
    parser.add_argument("--output", "--out", dest="out", default="output/demo", help="output folder")
    parser.add_argument("--queries", type=int, default=8, help="queries shown in the report")
    parser.add_argument("--cascade-topk", type=int, default=30, metavar="K",
                        help="evaluate QEEPS as a cascade: query-agnostic first stage, then the "
                             "K best gallery images per query as pairs (0 = every pair: 6,000 "
                             "pairs, about 8 min on 2 CPU cores)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()

    from qeeps_d2.data.datasets.catalog import dataset_root
    from qeeps_d2.data.synthps import ensure_synthps, format_synthps_stats, synthps_stats
    from qeeps_d2.engine.experiments import run_config
    from qeeps_d2.engine.pretrain import ensure_pretrained

    _say("1/5 SynthPS data set")
    root = ensure_synthps(dataset_root("synthps_train"))
    print(format_synthps_stats(synthps_stats(root)), flush=True)

    pretrained = os.path.join(args.out, "pretrain", "model_final.pth")
    _say(f"2/5 identity pretraining of the trunk (disjoint SynthPS identities) -> {pretrained}")
    ensure_pretrained(os.path.join(REPO, MODELS[0][1]), pretrained, list(args.opts), echo=_say)

    rows = []
    for step, (label, config) in enumerate(MODELS, start=3):
        out = os.path.join(args.out, label.lower())
        opts = ["OUTPUT_DIR", out] + list(args.opts)
        if label == "QEEPS":
            opts += ["MODEL.WEIGHTS", os.path.join(args.out, "oim", "model_final.pth"),
                     "TEST.PERSON_SEARCH.CASCADE_TOPK", str(args.cascade_topk)]
        else:
            opts += ["MODEL.WEIGHTS", pretrained]
        _say(f"{step}/5 {label}: train ({config}) and evaluate; full log in {out}/experiment.log")
        rows.append(run_config(os.path.join(REPO, config), GALLERY_SIZES, opts,
                               echo=lambda line, l=label: _say(f"  {l}: {line}")))
        rows[-1]["config"] = label

    _say("5/5 report")
    report = _report(args.out, rows, args.queries)
    print()
    print(_table(rows))
    if args.cascade_topk > 0:
        print(f"\nQEEPS is evaluated as a cascade: per query, the first stage of the same "
              f"network (query guidance off in the network: each gallery image runs once; its "
              f"detections scored by the local similarity head) shortlists {args.cascade_topk} "
              f"of the 100 gallery images, only those run as (query, gallery) pairs; gallery 50 "
              f"is scored from the same run (--cascade-topk 0: every pair).")
    print(f"\nQEEPS - OIM: mAP {rows[1]['mAP@100'] - rows[0]['mAP@100']:+.1f} pp, top-1 "
          f"{rows[1]['top1@100'] - rows[0]['top1@100']:+.1f} pp at gallery 100 "
          f"({rows[0]['num_queries']} queries)")
    from qeeps_d2.data.datasets.catalog import load_protocol
    from qeeps_d2.evaluation.results_file import read_results

    protocol = load_protocol("synthps_test", max(GALLERY_SIZES))
    for (label, _), row in zip(MODELS, rows):
        sims = top1_similarities(protocol, read_results(row["results"]).detections_by_query())
        print(format_similarities(label, sims))
    print(f"Report: {report}")
    _say(f"done in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
