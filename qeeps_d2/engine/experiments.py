"""Train-if-needed, evaluate and tabulate configs: the engine of ``make demo`` and
``tools/ablation.py`` (the paper's Table 1 on any data set).

For each config: train with the installed training command (``python -m
qeeps_d2.engine.train_cli``, i.e. ``qeeps-train`` / ``projects/QEEPS/train_net.py``, in its own
process) unless ``OUTPUT_DIR/model_final.pth`` exists (an interrupted run is resumed from its last
checkpoint), evaluate once on the largest gallery size, then score every smaller gallery size from
the same results file (a query's detections in a gallery image do not depend on the gallery size,
so this equals a separate run when the smaller galleries are subsets of the larger ones, which is
checked). Numbers come from files: the iterations trained from Detectron2's ``metrics.json``, the
metrics from the evaluator's metrics and results files; the command's output only feeds the
progress lines passed to ``echo``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["run_config", "format_table", "TRAIN_COMMAND", "trained_iterations"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the training command, found wherever the package is installed
TRAIN_COMMAND = [sys.executable, "-m", "qeeps_d2.engine.train_cli"]
# progress lines worth echoing from a training run (display only): training and evaluation ETA
_PROGRESS = re.compile(r"(eta: \S+\s+iter: \d+|Inference done \d+/\d+.*ETA=\S+|copypaste: \S.*)")


def _train_net(args: Sequence[str], log_path: str, echo: Optional[Callable[[str], None]]) -> float:
    """Run the training command with ``args``; the full output goes to ``log_path``, progress
    lines to ``echo``. Returns the wall time in seconds; raises RuntimeError on failure."""
    start = time.perf_counter()
    with open(log_path, "a", buffering=1) as log:  # line-buffered: tail -f works
        proc = subprocess.Popen([*TRAIN_COMMAND, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            match = _PROGRESS.search(line)
            if echo is not None and match:
                echo(match.group(1))
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"qeeps-train {' '.join(args[:2])} failed (exit {code}); see {log_path}")
    return time.perf_counter() - start


def trained_iterations(output_dir: str) -> Optional[int]:
    """Iterations a training run in ``output_dir`` completed, from Detectron2's
    ``metrics.json`` (its last entry's ``iteration`` + 1); None without one."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    last = None
    with open(path) as f:
        for line in f:
            if line.strip():
                last = json.loads(line)
    return None if last is None else int(last["iteration"]) + 1


def eval_dir_name(gallery_size: int, cascade_topk: int = 0, gt_boxes: bool = False) -> str:
    """Folder (under the config's OUTPUT_DIR) of one evaluation: each kind gets its own, so an
    evaluation with ground-truth boxes never reuses one with the model's detections."""
    return (f"eval_G{gallery_size}" + (f"_cascade{cascade_topk}" if cascade_topk else "")
            + ("_gtboxes" if gt_boxes else ""))


def run_config(config: str, gallery_sizes: Sequence[int], opts: Sequence[str] = (),
               echo: Optional[Callable[[str], None]] = print) -> Dict:
    """Train (if needed) and evaluate one config; returns its table row (see module docstring).

    Row keys: config, output_dir, iters (from ``metrics.json``; None without one), train_s /
    eval_s (when run here, else from an earlier run), recall / plain_recall (detector recall in
    percent, None if not reported),
    ``mAP@<size>`` / ``top1@<size>`` (percent), num_queries, results (path of the results file).
    """
    from qeeps_d2.config import cascade_topk
    from qeeps_d2.data.datasets.catalog import load_protocol
    from qeeps_d2.engine.trainer import setup_cfg
    from qeeps_d2.evaluation.results_file import read_results
    from qeeps_d2.evaluation.search_evaluator import GT_BOXES_SUFFIX
    from qeeps_d2.evaluation.search_metrics import score_search

    sizes = sorted(gallery_sizes)
    opts = list(opts)
    cfg = setup_cfg(config, opts, resolve_schedule=False)
    out = cfg.OUTPUT_DIR
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "experiment.log")
    weights = os.path.join(out, "model_final.pth")
    timing_path = os.path.join(out, "experiment_timing.json")
    timing = {}
    if os.path.exists(timing_path):
        with open(timing_path) as f:
            timing = json.load(f)
    if not os.path.exists(weights):
        resume = ["--resume"] if os.path.exists(os.path.join(out, "last_checkpoint")) else []
        # DATASETS.TEST () skips the trainer's own final evaluation: the one below covers it
        timing["train_s"] = _train_net(
            ["--config-file", config, *resume, *opts, "DATASETS.TEST", "()"], log, echo)
    dataset = cfg.DATASETS.TEST[0]
    cascade = cascade_topk(cfg)

    gt_boxes = cfg.TEST.PERSON_SEARCH.USE_GT_BOXES
    eval_dir = os.path.join(out, eval_dir_name(sizes[-1], cascade, gt_boxes))
    # the evaluator's file names and metrics key
    suffix = GT_BOXES_SUFFIX if gt_boxes else ""
    metrics_path = os.path.join(eval_dir, "inference", f"{dataset}{suffix}_metrics.json")
    if not os.path.exists(metrics_path):
        timing["eval_s"] = _train_net(
            ["--config-file", config, "--eval-only", *opts, "MODEL.WEIGHTS", weights,
             "OUTPUT_DIR", eval_dir, "TEST.PERSON_SEARCH.GALLERY_SIZE", str(sizes[-1])],
            log, echo)
    with open(timing_path, "w") as f:
        json.dump(timing, f)
    with open(metrics_path) as f:
        saved = json.load(f)
    recall = saved.get("proposal_recall", {})
    results_path = os.path.join(eval_dir, "inference", f"{dataset}{suffix}_results.json.gz")
    detections = read_results(results_path).detections_by_query()
    largest = load_protocol(dataset, sizes[-1])
    row = {"config": os.path.relpath(config, REPO), "output_dir": out,
           "iters": trained_iterations(out), **timing,
           "recall": recall.get("recall"), "plain_recall": recall.get("plain_recall"),
           "num_queries": len(detections), "results": results_path, "cascade_topk": cascade,
           "gt_boxes": gt_boxes}
    for size in sizes:
        protocol = load_protocol(dataset, size)
        for i in detections:
            if not set(protocol.gallery(i).images) <= set(largest.gallery(i).images):
                raise ValueError(f"G{size} of query {i} is not a subset of G{sizes[-1]}")
        scores = score_search(protocol, detections, cfg.TEST.PERSON_SEARCH.DET_THRESH,
                              query_indices=sorted(detections))
        row[f"mAP@{size}"] = 100 * scores.mean_ap
        row[f"top1@{size}"] = 100 * scores.top_k(1)
    return row


def format_table(rows: List[Dict], gallery_sizes: Sequence[int]) -> str:
    """Markdown table: mAP / top-1 per gallery size, detector recall, iterations and times;
    cascade evaluations are labelled with their K."""
    sizes = sorted(gallery_sizes)
    head = ["config"] + [f"{m} G{s}" for s in sizes for m in ("mAP", "top-1")] + [
        "recall", "iters", "train (min)", "eval (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        recall = "-" if r["recall"] is None else f"{r['recall']:.1f}"
        if r["plain_recall"] is not None and r["plain_recall"] != r["recall"]:
            recall += f" (RPN alone {r['plain_recall']:.1f})"
        label = r["config"] + (f" (cascade, K={r['cascade_topk']})" if r.get("cascade_topk") else "")
        if r.get("gt_boxes"):
            label += ", GT boxes"
        cells = [label] + [f"{r[f'{m}@{s}']:.1f}" for s in sizes for m in ("mAP", "top1")]
        cells += [recall, "-" if r["iters"] is None else str(r["iters"])]
        cells += [f"{r[k] / 60:.1f}" if k in r else "-" for k in ("train_s", "eval_s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
