#!/usr/bin/env python
"""Full-protocol evaluation cost from measured per-forward rates (a ``benchmarks/run.py`` JSON).

    python benchmarks/protocol_cost.py output/bench_cpu.json --size r50_600 --k 10 50

Counts forwards with :mod:`qeeps_d2.evaluation.cascade` (exhaustive: every (query, gallery
image) pair; cascade: gallery images and query boxes once query-agnostically, then K pairs per
query) and multiplies them by the row's measured seconds per pair (at its faster batch size),
per gallery image and per query box. Protocol sizes: CUHK-SYSU test (2,900 queries, 6,978
gallery images, G100), PRW test (2,057 queries against the 6,112 test frames, the query's own
frame excluded) and PRW-mini (30 of those queries).
"""
from __future__ import annotations

import argparse
import json
import sys

from qeeps_d2.evaluation.cascade import cascade_cost, exhaustive_cost

# name -> (number of queries, distinct gallery images per query, gallery images in total)
PROTOCOLS = {
    "CUHK-SYSU G100": (2900, 100, 6978),
    "PRW": (2057, 6111, 6112),
    "PRW-mini": (30, 6111, 6112),
}


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json")
    parser.add_argument("--size", default="r50_600")
    parser.add_argument("--k", type=int, nargs="+", default=[10])
    args = parser.parse_args(argv)
    with open(args.bench_json) as f:
        bench = json.load(f)
    rows = {r["size"]: r for r in bench["rows"]}
    if args.size not in rows:
        parser.error(f"{args.bench_json} has no row {args.size!r} (has {sorted(rows)})")
    r = rows[args.size]
    batch = bench["args"]["batch"]
    per_pair = min(r["qeeps_pair_s_b1"], r[f"qeeps_pair_s_b{batch}"])
    rates = dict(per_pair=per_pair, per_image=r["oim_gallery_image_s"],
                 per_query=r["oim_query_box_s"])
    info = bench["info"]
    print(f"{args.size} on {info['device']} ({info.get('gpu', info['cpu'])}), {info['threads']} "
          f"threads: {per_pair:.3f} s per pair, {rates['per_image']:.3f} s per gallery image, "
          f"{rates['per_query']:.3f} s per query box")
    head = ["protocol", "pairs", "exhaustive"] + [f"cascade K={k}" for k in args.k]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, (queries, per_query, images) in PROTOCOLS.items():
        sizes = [per_query] * queries
        full = exhaustive_cost(sizes)
        cells = [name, f"{full.pairs:,}", _duration(full.seconds(**rates))]
        for k in args.k:
            c = cascade_cost(sizes, k, images)
            cells.append(f"{_duration(c.seconds(**rates))} ({c.pairs:,} pairs)")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
