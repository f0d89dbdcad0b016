#!/usr/bin/env python
"""Exhaustive vs cascade evaluation of a query-guided model: mAP / top-1, pairs and wall time.

    python tools/cascade_eval.py --config configs/SynthPS/qeeps.yaml \\
        --weights output/synthps/qeeps/model_final.pth --topk 5 10 20 --gallery-sizes 50 100 \\
        [--exhaustive-results output/synthps/qeeps/eval_G100/inference/synthps_test_results.json.gz] \\
        [--out output/synthps/cascade] [--max-queries N] [KEY VALUE ...]

For every gallery size and every K the cascade runs for real through ``Trainer.test`` (the
``--eval-only`` path, ``TEST.PERSON_SEARCH.CASCADE_TOPK K``): its wall time covers both stages
(the query-agnostic pass over the gallery images and query boxes, then K pairs per query). The
exhaustive pair evaluation runs once on the largest gallery (or is read from
``--exhaustive-results``, a results file of that model and gallery size: its time is then not
known); smaller galleries that are subsets of it are scored from the same rows (a pair's
detections do not depend on the gallery), their time estimated from the measured rate ("est.").
The first-stage-only row is the query-agnostic pass alone (the OIM-style search with the
query-guided network). The table also goes to ``OUT/cascade_eval.md`` and ``.json``.
"""
import json
import os
import sys
import time

from detectron2.utils.logger import setup_logger

from qeeps_d2.checkpoint import QEEPSCheckpointer
from qeeps_d2.data.build import evaluated_queries, load_test_protocol, uses_pairs
from qeeps_d2.engine import Trainer, setup_cfg
from qeeps_d2.evaluation.cascade import protocol_costs
from qeeps_d2.evaluation.results_file import read_results, validate_against_protocol
from qeeps_d2.evaluation.search_metrics import score_search
from qeeps_d2.utils.cli import ArgumentParser, UsageError, run_cli


def _parser():
    p = ArgumentParser(prog="cascade_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a query-guided model's config")
    p.add_argument("--weights", required=True, help="its trained weights")
    p.add_argument("--topk", type=int, nargs="+", default=[5, 10, 20],
                   help="cascade shortlist lengths K (default 5 10 20)")
    p.add_argument("--gallery-sizes", type=int, nargs="+", default=[50, 100])
    p.add_argument("--exhaustive-results", help="reuse this exhaustive results file (largest size)")
    p.add_argument("--out", default="output/cascade_eval", help="output folder")
    p.add_argument("--max-queries", type=int, default=0, help="first N queries only (partial)")
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    return p


class _Runner:
    """Evaluations of one model on the config's first test set, timed."""

    def __init__(self, args):
        self.args = args
        self.opts = list(args.opts) + ["MODEL.WEIGHTS", args.weights,
                                       "TEST.PERSON_SEARCH.MAX_QUERIES", str(args.max_queries)]
        cfg = self.cfg()
        if not uses_pairs(cfg):
            raise UsageError(f"--config {args.config}: not a query-guided model (QSSE, QRPN and "
                             "QSimNet are off); its evaluation already runs each image once")
        self.dataset = cfg.DATASETS.TEST[0]
        self.det_thresh = cfg.TEST.PERSON_SEARCH.DET_THRESH
        self.model = Trainer.build_model(cfg)
        QEEPSCheckpointer(self.model).load(args.weights)

    def cfg(self, size=None, k: int = 0, out: str = ""):
        """The config, with gallery size ``size`` and CASCADE_TOPK ``k``, writing to OUT/out."""
        extra = []
        if size is not None:
            extra += ["TEST.PERSON_SEARCH.GALLERY_SIZE", str(size),
                      "TEST.PERSON_SEARCH.CASCADE_TOPK", str(k),
                      "DATASETS.TEST", f"('{self.dataset}',)"]
        if out:
            extra += ["OUTPUT_DIR", os.path.join(self.args.out, out)]
        return setup_cfg(self.args.config, self.opts + extra, resolve_schedule=False)

    def evaluate(self, size: int, k: int):
        """(metrics, results file path, seconds) of one Trainer.test run."""
        name = f"G{size}_" + (f"cascade{k}" if k else "exhaustive")
        cfg = self.cfg(size, k, name)
        start = time.perf_counter()
        metrics = Trainer.test(cfg, self.model)
        seconds = time.perf_counter() - start
        path = os.path.join(cfg.OUTPUT_DIR, "inference", f"{self.dataset}_results.json.gz")
        return metrics["person_search"], path, seconds


def _rows(runner: _Runner, args) -> list:
    sizes, rows = sorted(set(args.gallery_sizes)), []
    largest = sizes[-1]
    protocols = {s: load_test_protocol(runner.cfg(s), runner.dataset) for s in sizes}
    queries = {s: evaluated_queries(runner.cfg(s), protocols[s]) for s in sizes}

    def row(method, size, ps_or_scores, pairs, seconds, estimated=False):
        rows.append({"method": method, "gallery": size, "mAP": ps_or_scores[0],
                     "top1": ps_or_scores[1], "pairs": pairs, "seconds": seconds,
                     "estimated": estimated})

    # exhaustive, largest gallery: reused or run
    if args.exhaustive_results:
        path, seconds = args.exhaustive_results, None
        results = read_results(path)
        if results.extra.get("mode") != "pairs":
            raise UsageError(f"--exhaustive-results {path}: mode {results.extra.get('mode')!r}, "
                             "expected an exhaustive 'pairs' results file")
        validate_against_protocol(results, protocols[largest], path)
    else:
        _, path, seconds = runner.evaluate(largest, 0)
    detections = read_results(path).detections_by_query()
    for size in sizes:
        protocol, indices = protocols[size], queries[size]
        indices = indices if indices is not None else list(range(len(protocol)))
        pairs = protocol_costs(protocol, 1, indices)[0].pairs
        subset = all(set(protocol.gallery(i).images) <= set(protocols[largest].gallery(i).images)
                     for i in indices)
        missing = [i for i in indices if i not in detections]
        if missing:
            raise UsageError(f"{path}: query {missing[0]} is missing (a partial results file?)")
        if size == largest or subset:
            scores = score_search(protocol, detections, runner.det_thresh, query_indices=indices)
            total = protocol_costs(protocols[largest], 1, indices)[0].pairs
            est = None if seconds is None else seconds * pairs / total
            row("exhaustive", size, (100 * scores.mean_ap, 100 * scores.top_k(1)), pairs, est,
                estimated=size != largest)
        else:  # not a subset: its own run
            ps, _, secs = runner.evaluate(size, 0)
            row("exhaustive", size, (ps["mAP"], ps["top1"]), pairs, secs)
    # cascade: every size and K for real
    for size in sizes:
        for k in sorted(set(args.topk)):
            ps, _, seconds = runner.evaluate(size, k)
            if k == min(args.topk):
                row("first stage only (query-agnostic)", size,
                    (ps["first_stage_mAP"], ps["first_stage_top1"]), 0, None)
            row(f"cascade K={k}", size, (ps["mAP"], ps["top1"]), ps["num_pairs"], seconds)
    return rows


def format_table(rows: list, dataset: str) -> str:
    """Markdown: one line per method, per gallery size mAP / top-1 / pairs / time."""
    sizes = sorted({r["gallery"] for r in rows})
    head = ["method"] + [f"{h} G{s}" for s in sizes for h in ("mAP", "top-1", "pairs", "time (s)")]
    lines = [f"{dataset}:", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[r["gallery"]] = r
    for method, cells in by_method.items():
        line = [method]
        for s in sizes:
            r = cells.get(s)
            if r is None:
                line += ["-"] * 4
                continue
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}" + (
                " est." if r["estimated"] else "")
            line += [f"{r['mAP']:.1f}", f"{r['top1']:.1f}", str(r["pairs"]), secs]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _run(args):
    if min(args.topk) < 1:
        raise UsageError(f"--topk values must be >= 1, got {args.topk}")
    if not os.path.isfile(args.config):
        raise UsageError(f"--config {args.config}: file not found")
    if not os.path.isfile(args.weights):
        raise UsageError(f"--weights {args.weights}: file not found")
    os.makedirs(args.out, exist_ok=True)
    setup_logger(output=args.out, name="detectron2")
    setup_logger(output=args.out, name="qeeps_d2", abbrev_name="qeeps")
    runner = _Runner(args)
    rows = _rows(runner, args)
    table = format_table(rows, runner.dataset)
    with open(os.path.join(args.out, "cascade_eval.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "cascade_eval.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return [table]


def main(argv=None) -> int:
    return run_cli("cascade_eval", _parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
