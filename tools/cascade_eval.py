#!/usr/bin/env python
"""Exhaustive vs cascade evaluation of a query-guided model: mAP / top-1, pairs and wall time.

    python tools/cascade_eval.py --config configs/SynthPS/qeeps.yaml \\
        --weights output/synthps/qeeps/model_final.pth --topk 5 10 20 --gallery-sizes 50 100 \\
        [--exhaustive-results output/synthps/qeeps/eval_G100/inference/synthps_test_results.json.gz]
        [--emulate [--seconds-per-pair S]] [--out output/cascade_eval] [--max-queries N]
        [KEY VALUE ...]

Exhaustive: the pair evaluation runs once on the largest gallery (or is read from
``--exhaustive-results``, a results file of that model and gallery size; its time is then
unknown); smaller galleries that are subsets of it are scored from the same rows (a pair's
detections do not depend on the gallery) with the time scaled by their pair count ("est.").

Cascade, default: every gallery size and K runs for real through ``Trainer.test`` (the
``--eval-only`` path with ``TEST.PERSON_SEARCH.CASCADE_TOPK K``); its wall time covers both
stages (the query-agnostic pass over the gallery images and query boxes, then K pairs per query).

Cascade, ``--emulate``: the query-agnostic first stage runs once (timed) and every (gallery
size, K) is computed from it and the exhaustive rows of the shortlisted pairs, with no further
forward pass (``qeeps_d2.evaluation.cascade.cascade_rows``); times are estimated as the first
stage's + pairs x the exhaustive per-pair time (or ``--seconds-per-pair``). The pair rows then
come from the exhaustive run's batches instead of the cascade's own, which can differ in the
last float digits.

The "first stage only" row is the query-agnostic pass alone (OIM-style search with the
query-guided network). The table also goes to ``OUT/cascade_eval.md`` and ``.json``.
"""
import argparse
import json
import os
import sys
import time

from detectron2.evaluation import inference_on_dataset
from detectron2.utils.logger import setup_logger

from qeeps_d2.checkpoint import QEEPSCheckpointer
from qeeps_d2.config import is_query_guided
from qeeps_d2.data.build import build_person_search_test_loader, evaluated_queries, load_test_protocol
from qeeps_d2.engine import Trainer, setup_cfg
from qeeps_d2.evaluation.cascade import cascade_rows, protocol_costs
from qeeps_d2.evaluation.results_file import read_results, validate_against_protocol
from qeeps_d2.evaluation.search_metrics import score_search
from qeeps_d2.utils.cli import (ArgumentParser, UsageError, add_model_arguments,
                                add_output_argument, model_opts, run_cli)

FIRST_STAGE = "first stage only (query-agnostic)"


def _parser():
    p = ArgumentParser(prog="cascade_eval", description=__doc__.split("\n\n")[0])
    add_model_arguments(p, device=False, opts=False)
    p.add_argument("--topk", type=int, nargs="+", default=[5, 10, 20],
                   help="cascade shortlist lengths K (default 5 10 20)")
    p.add_argument("--gallery-sizes", type=int, nargs="+", default=[50, 100])
    p.add_argument("--exhaustive-results", help="reuse this exhaustive results file (largest size)")
    p.add_argument("--emulate", action="store_true",
                   help="cascade numbers from one first-stage pass + the exhaustive rows")
    p.add_argument("--seconds-per-pair", type=float,
                   help="per-pair time for --emulate estimates when the exhaustive time is unknown")
    add_output_argument(p, "output/cascade_eval")
    p.add_argument("--max-queries", type=int, default=0, help="first N queries only (partial)")
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    p.add_argument("--opts", dest="more_opts", nargs=argparse.REMAINDER, default=[],
                   metavar="KEY VALUE", help="config overrides (as Detectron2's demo takes them)")
    return p


def _namespace(args):
    """``args`` with ``--opts`` under the name :func:`model_opts` reads."""
    return argparse.Namespace(opts=args.more_opts, confidence_threshold=args.confidence_threshold)


class _Runner:
    """Timed evaluations of one model on the config's first test set."""

    def __init__(self, args):
        self.args = args
        self.opts = list(args.opts) + model_opts(_namespace(args)) + ["MODEL.WEIGHTS", args.weights,
                                       "TEST.PERSON_SEARCH.MAX_QUERIES", str(args.max_queries)]
        cfg = self.cfg()
        if not is_query_guided(cfg):
            raise UsageError(f"--config {args.config_file}: not a query-guided model (QSSE, QRPN and "
                             "QSimNet are off); its evaluation already runs each image once")
        if not cfg.DATASETS.TEST:
            raise UsageError(f"--config {args.config_file}: DATASETS.TEST is empty (a demo's saved "
                             "config has none): add --opts DATASETS.TEST '(\"synthps_test\",)'")
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
            extra += ["OUTPUT_DIR", os.path.join(self.args.output, out)]
        return setup_cfg(self.args.config_file, self.opts + extra, resolve_schedule=False)

    def evaluate(self, size: int, k: int = 0, agnostic: bool = False):
        """(person-search metrics, results file path, seconds) of one run: Trainer.test
        (exhaustive or cascade K), or the query-agnostic pass alone."""
        name = f"G{size}_" + ("first_stage" if agnostic else f"cascade{k}" if k else "exhaustive")
        cfg = self.cfg(size, k, name)
        start = time.perf_counter()
        if agnostic:
            loader = build_person_search_test_loader(cfg, self.dataset, mode="agnostic")
            evaluator = Trainer.build_evaluator(cfg, self.dataset)
            metrics = inference_on_dataset(self.model, loader, evaluator)
        else:
            metrics = Trainer.test(cfg, self.model)
        seconds = time.perf_counter() - start
        path = os.path.join(cfg.OUTPUT_DIR, "inference", f"{self.dataset}_results.json.gz")
        return metrics["person_search"], path, seconds


def _rows(runner: _Runner, args) -> list:
    sizes, rows = sorted(set(args.gallery_sizes)), []
    largest = sizes[-1]
    protocols = {s: load_test_protocol(runner.cfg(s), runner.dataset) for s in sizes}
    queries = {}
    for s in sizes:
        indices = evaluated_queries(runner.cfg(s), protocols[s])
        queries[s] = indices if indices is not None else list(range(len(protocols[s])))

    def row(method, size, scores, pairs, seconds, estimated=False):
        rows.append({"method": method, "gallery": size, "mAP": scores[0], "top1": scores[1],
                     "pairs": pairs, "seconds": seconds, "estimated": estimated})

    def score(size, detections):
        s = score_search(protocols[size], detections, runner.det_thresh,
                         query_indices=queries[size])
        return 100 * s.mean_ap, 100 * s.top_k(1)

    # exhaustive, largest gallery: reused or run; smaller ones scored from it when subsets
    if args.exhaustive_results:
        path, seconds = args.exhaustive_results, None
        results = read_results(path)
        if results.extra.get("mode") != "pairs":
            raise UsageError(f"--exhaustive-results {path}: mode {results.extra.get('mode')!r}, "
                             "expected an exhaustive 'pairs' results file")
        validate_against_protocol(results, protocols[largest], path)
    else:
        _, path, seconds = runner.evaluate(largest)
    exhaustive = read_results(path).detections_by_query()
    missing = [i for i in queries[largest] if i not in exhaustive]
    if missing:
        raise UsageError(f"{path}: query {missing[0]} is missing (a partial results file?)")
    total = protocol_costs(protocols[largest], 1, queries[largest])[0].pairs
    per_pair = seconds / total if seconds is not None else args.seconds_per_pair
    subsets = {s: all(set(protocols[s].gallery(i).images)
                      <= set(protocols[largest].gallery(i).images) for i in queries[s])
               for s in sizes}
    for size in sizes:
        pairs = protocol_costs(protocols[size], 1, queries[size])[0].pairs
        if subsets[size]:
            est = None if seconds is None else seconds * pairs / total
            row("exhaustive", size, score(size, exhaustive), pairs, est, size != largest)
        elif args.emulate:
            raise UsageError(f"--emulate: G{size} is not a subset of G{largest}")
        else:
            ps, _, secs = runner.evaluate(size)
            row("exhaustive", size, (ps["mAP"], ps["top1"]), pairs, secs)

    if args.emulate:
        ps, path, first_seconds = runner.evaluate(largest, agnostic=True)
        first = read_results(path).detections_by_query()
        first_forwards = protocol_costs(protocols[largest], 1, queries[largest])[1]
        for size in sizes:
            cost = protocol_costs(protocols[size], 1, queries[size])[1]
            # first-stage time scaled to this size's gallery images + query boxes
            t1 = first_seconds * (cost.gallery_images + cost.query_boxes) / (
                first_forwards.gallery_images + first_forwards.query_boxes)
            row(FIRST_STAGE, size, score(size, first), 0, t1, size != largest)
            galleries = {i: protocols[size].gallery(i).images for i in queries[size]}
            for k in sorted(set(args.topk)):
                merged, lists = cascade_rows(galleries, first, exhaustive, k, runner.det_thresh)
                pairs = sum(len(v) for v in lists.values())
                est = None if per_pair is None else t1 + pairs * per_pair
                row(f"cascade K={k} (emulated)", size, score(size, merged), pairs, est, True)
        return rows

    for size in sizes:  # cascade: every size and K for real
        for k in sorted(set(args.topk)):
            ps, _, seconds = runner.evaluate(size, k)
            if k == min(args.topk):
                row(FIRST_STAGE, size, (ps["first_stage_mAP"], ps["first_stage_top1"]), 0, None)
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
    for flag, path in (("--config-file", args.config_file), ("--weights", args.weights)):
        if not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: file not found")
    os.makedirs(args.output, exist_ok=True)
    setup_logger(output=args.output, name="detectron2")
    setup_logger(output=args.output, name="qeeps_d2", abbrev_name="qeeps")
    runner = _Runner(args)
    rows = _rows(runner, args)
    table = format_table(rows, runner.dataset)
    with open(os.path.join(args.output, "cascade_eval.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output, "cascade_eval.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return [table]


def main(argv=None) -> int:
    return run_cli("cascade_eval", _parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
