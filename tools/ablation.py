#!/usr/bin/env python
"""Train and evaluate a list of configs and print the paper's Table 1 for them.

For each config: train with ``projects/QEEPS/train_net.py`` unless ``OUTPUT_DIR/model_final.pth``
exists (``--resume`` continues an interrupted run), evaluate once on the largest gallery size,
then score every smaller gallery size from the same results file (a query's detections in a
gallery image do not depend on the gallery size, so this equals a separate run when the smaller
galleries are subsets of the larger ones, which is checked). Prints (and writes with ``--out``) a
markdown table: mAP and top-1 per gallery size, detector recall, training and evaluation time.

    python tools/ablation.py configs/SynthPS/{oim,qrpn,qsimnet,qrpn_qsimnet,qeeps}.yaml \\
        --gallery-sizes 50 100 --out output/synthps/table1.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "projects", "QEEPS", "train_net.py")


def _run(args, log_path):
    """Run train_net.py with ``args``, output to ``log_path``; returns the wall time."""
    start = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, TRAIN_NET] + args, stdout=log, stderr=log)
    if proc.returncode != 0:
        sys.exit(f"ablation: {' '.join(args[:2])} failed (exit {proc.returncode}); see {log_path}")
    return time.perf_counter() - start


def _row(config, sizes, opts):
    from qeeps_d2.data.catalog import load_protocol
    from qeeps_d2.engine import setup_cfg
    from qeeps_d2.evaluation.results_file import read_results
    from qeeps_d2.evaluation.search_metrics import score_search

    cfg = setup_cfg(config, opts, resolve_schedule=False)
    out = cfg.OUTPUT_DIR
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "ablation.log")
    weights = os.path.join(out, "model_final.pth")
    timing_path = os.path.join(out, "ablation_timing.json")
    timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
    if not os.path.exists(weights):
        resume = ["--resume"] if os.path.exists(os.path.join(out, "last_checkpoint")) else []
        timing["train_s"] = _run(["--config-file", config, *resume, *opts], log)
    dataset = cfg.DATASETS.TEST[0]
    eval_dir = os.path.join(out, f"eval_G{max(sizes)}")
    metrics_path = os.path.join(eval_dir, "inference", f"{dataset}_metrics.json")
    if not os.path.exists(metrics_path):
        timing["eval_s"] = _run(
            ["--config-file", config, "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR",
             eval_dir, "TEST.PERSON_SEARCH.GALLERY_SIZE", str(max(sizes)), *opts], log)
    with open(timing_path, "w") as f:
        json.dump(timing, f)
    metrics = json.load(open(metrics_path))
    results = read_results(os.path.join(eval_dir, "inference", f"{dataset}_results.json.gz"))
    detections = results.detections_by_query()
    largest = load_protocol(dataset, max(sizes))
    row = {"config": os.path.relpath(config, REPO), "iters": cfg.SOLVER.MAX_ITER, **timing,
           "recall": metrics["person_search"].get("proposal_recall"),
           "plain_recall": metrics["person_search"].get("plain_proposal_recall")}
    for size in sizes:
        protocol = load_protocol(dataset, size)
        for i in detections:
            if not set(protocol.gallery(i).images) <= set(largest.gallery(i).images):
                sys.exit(f"ablation: G{size} of query {i} is not a subset of G{max(sizes)}")
        scores = score_search(protocol, detections, cfg.TEST.PERSON_SEARCH.DET_THRESH,
                              query_indices=sorted(detections))
        row[f"mAP@{size}"] = 100 * scores.mean_ap
        row[f"top1@{size}"] = 100 * scores.top_k(1)
    row["num_queries"] = len(detections)
    return row


def _table(rows, sizes):
    head = ["config"] + [f"{m} G{s}" for s in sizes for m in ("mAP", "top-1")] + [
        "recall", "train (min)", "eval (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        recall = "-" if r["recall"] is None else f"{r['recall']:.1f}"
        if r["plain_recall"] is not None and r["plain_recall"] != r["recall"]:
            recall += f" (RPN alone {r['plain_recall']:.1f})"
        cells = [r["config"]] + [f"{r[f'{m}@{s}']:.1f}" for s in sizes for m in ("mAP", "top1")]
        cells += [recall] + [f"{r[k] / 60:.1f}" if k in r else "-" for k in ("train_s", "eval_s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--gallery-sizes", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--out", help="also write the markdown table (and a .json) here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for all")
    args = parser.parse_args(argv)
    sizes = sorted(args.gallery_sizes)
    rows = []
    for config in args.configs:
        rows.append(_row(config, sizes, args.opts))
        print(_table(rows[-1:], sizes).splitlines()[-1], flush=True)
    table = _table(rows, sizes)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
